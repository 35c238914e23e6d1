"""The decision report's arithmetic and rendering, on hand-made figures (no models)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from tunedex.infra.config import EvaluateConfig
from tunedex.workers.evaluate import attribution, bootstrap_ci, summarize
from tunedex.workers.report import recommend, table, to_html, write


def strategy(static: list[float], changed: list[float], style: float, p95: float, cost: float, retrieves: bool) -> dict:
    rows = [{"split": "static", "f1": v, "style": style} for v in static] + \
           [{"split": "changed", "f1": v, "style": style} for v in changed]
    if retrieves:
        for r in rows:
            r.update(recall=1.0, mrr=1.0, attribution=1.0)
    return {**summarize(rows), "by_split": {s: summarize([r for r in rows if r["split"] == s]) for s in ("changed", "static")},
            "latency_ms": {"p50": p95 / 2, "p95": p95, "samples": [p95 / 2] * 3}, "throughput_qps": 10.0,
            "cost_per_1k_usd": cost, "rows": rows}


def report() -> dict:
    good, bad = [0.9, 1.0, 0.8, 0.95] * 5, [0.1, 0.0, 0.2, 0.05] * 5
    return {"release_id": "rel-x", "qa_file": "qa.jsonl", "n": 40, "metric": "f1", "created_at": "2026-11-26T00:00:00",
            "one_off": {"finetune_usd": 0.1}, "strategies": {
                "base": strategy(bad, bad, 0.0, 100, 0.01, False),
                "finetuned": strategy(good, bad, 1.0, 100, 0.01, False),
                "rag": strategy(good, good, 0.0, 150, 0.02, True),
                "hybrid": strategy(good, good, 1.0, 150, 0.02, True)}}


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    few, many = [1.0, 0.0] * 5, [1.0, 0.0] * 200
    lo, hi = bootstrap_ci(few)
    assert lo < 0.5 < hi
    lo2, hi2 = bootstrap_ci(many)
    assert lo < lo2 < 0.5 < hi2 < hi
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_attribution_counts_citations_of_supporting_docs_only():
    assert attribution("It costs $5. [2]", ["a", "gold"], ("gold",)) == 1.0
    assert attribution("It costs $5. [1]", ["a", "gold"], ("gold",)) == 0.0
    assert attribution("It costs $5. [9]", ["a", "gold"], ("gold",)) == 0.0
    assert attribution("It costs $5.", ["gold"], ("gold",)) == 0.0


def test_recommendation_follows_the_intervals_and_the_criteria():
    r = report()
    lines = recommend(r, EvaluateConfig(metric="f1"))
    assert lines[0].startswith("recommendation: hybrid")
    assert any("stale" in line for line in lines) and any("house style comes from fine-tuning" in line for line in lines)
    # facts that never change and no need to cite: the fine-tuned model alone is as good, cheaper and faster
    assert recommend(r, EvaluateConfig(metric="f1", facts_change="rarely", need_attribution=False))[0].startswith(
        "recommendation: finetuned")
    tight = recommend(r, EvaluateConfig(metric="f1", facts_change="rarely", need_attribution=False, latency_budget_ms=120))
    assert tight[0].startswith("recommendation: finetuned")
    none_fit = recommend(r, EvaluateConfig(metric="f1", latency_budget_ms=10))
    assert any("no strategy meets the p95 budget" in line for line in none_fit)


def test_report_renders_table_html_with_three_charts_and_json(tmp_path):
    r = report()
    r["recommendation"] = recommend(r, EvaluateConfig(metric="f1"))
    lines = table(r).splitlines()
    assert lines[0].startswith("| strategy | split | n | f1 (95% CI) |") and len(lines) == 2 + 4 * 3
    assert any(line.startswith("| finetuned | changed | 20 | 0.09 [") for line in lines)
    page = to_html(r)
    assert page.count("<svg") == 3 and "recommendation: hybrid" in page
    for svg in page.split("<svg")[1:]:
        ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")  # well-formed
    json_path, html_path = write(r, tmp_path / "out")
    assert json.loads(json_path.read_text())["strategies"]["hybrid"]["f1"] == r["strategies"]["hybrid"]["f1"]
    assert html_path.read_text().startswith("<!doctype html>")


def test_report_takes_a_release_or_a_candidate_model_and_names_a_missing_one(tmp_path):
    from conftest import run_cli, write_config

    config, qa = write_config(tmp_path / "t.yaml", tmp_path / "data"), tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q", "answer": "a"}\n')
    both = run_cli("report", "-c", str(config), "--qa", str(qa), "--release", "rel-x", "--model", str(tmp_path),
                   cwd=tmp_path, check=False)
    assert both.returncode == 2 and "pass --release or --model, not both" in both.stderr + both.stdout
    missing = run_cli("report", "-c", str(config), "--qa", str(qa), "--model", str(tmp_path / "nope"), cwd=tmp_path,
                      check=False)
    assert missing.returncode == 1 and str(tmp_path / "nope") in missing.stderr + missing.stdout
    assert "Traceback" not in missing.stderr
