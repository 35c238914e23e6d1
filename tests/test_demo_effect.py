"""`tunedex demo-effect` for real (what `make demo-effect` runs): a tiny model fine-tuned on day 1 answers
day-1 facts from memory and is stale on the facts day 2 changed; retrieval keeps base and fine-tune
current; the fine-tune keeps the house style, with retrieval too. Asserted on the 95% bootstrap
intervals of the report, not on exact values. About 7 minutes on 2 cores: marked `effect`."""

import json

import pytest

from conftest import run_cli

from tunedex.workers.evaluate import normalize

pytestmark = [pytest.mark.slow, pytest.mark.effect, pytest.mark.timeout(3000)]


def test_the_finetune_is_stale_where_retrieval_is_current_and_keeps_the_house_style(stack, tmp_path):
    path, _ = stack
    effect = tmp_path / "effect"
    out = run_cli("demo-effect", str(effect), "-c", str(path), cwd=path.parent, timeout=2700).stdout
    report = json.loads((effect / "report" / "report.json").read_text())
    strategies = report["strategies"]

    def ci(strategy: str, split: str | None = None, metric: str = "contains") -> tuple[float, float]:
        part = strategies[strategy]["by_split"][split] if split else strategies[strategy]
        return tuple(part["ci"][metric])

    assert report["metric"] == "contains" and report["n"] > 80
    # from memory: the fine-tune knows day-1 facts that did not change; the base knows none of ours
    assert ci("finetuned", "static")[0] > ci("base", "static")[1], strategies["finetuned"]["by_split"]
    # stale where retrieval is current: on the facts day 2 changed, the fine-tune alone is below both
    # strategies that retrieve (it answers them with day-1 values)
    for retrieving in ("rag", "hybrid"):
        assert ci("finetuned", "changed")[1] < ci(retrieving, "changed")[0], (retrieving, ci(retrieving, "changed"))
    assert ci("rag", "static")[0] > ci("base", "static")[1]  # the base answers from the chunk, not from memory
    day1 = {r["question"]: r["answer"] for r in map(json.loads, (effect / "demo-data/day1/qa.jsonl").read_text().splitlines())}
    changed = [r for r in strategies["finetuned"]["rows"] if r["split"] == "changed"]
    stale = sum(normalize(day1[r["question"]]) in normalize(r["answer"]) for r in changed)
    current = sum(normalize(r["reference"]) in normalize(r["answer"]) for r in changed)
    assert stale > current, f"of {len(changed)} changed facts the fine-tune gave {stale} day-1 and {current} day-2 answers"
    # the house style comes from the fine-tune, and stays with retrieval
    assert ci("hybrid", metric="style")[0] > ci("rag", metric="style")[1]
    assert ci("hybrid", metric="style")[0] > 0.8
    # facts change daily (evaluate.facts_change): the recommendation is a strategy that retrieves
    assert report["recommendation"][0].startswith(("recommendation: hybrid", "recommendation: rag")), report["recommendation"]
    assert "| hybrid | changed |" in out and "1/4 pretraining the base" in out
