"""The decision report: fine-tune, RAG or both, from measured figures, as JSON, HTML (inline SVG plots) and a
printed table with a recommendation.

Plain functions over the dict `workers.evaluate.evaluate_strategies` returns; nothing here runs a model.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from tunedex.infra.config import EvaluateConfig

ORDER = ("base", "finetuned", "rag", "hybrid")
SPLIT_COLOURS = {"static": "#4c78a8", "changed": "#f58518", "all": "#54a24b"}


def fmt(summary: dict[str, Any], key: str) -> str:
    if key not in summary:
        return "-"
    lo, hi = summary["ci"][key]
    return f"{summary[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def table(report: dict[str, Any]) -> str:
    """One line per strategy and split: the metric, its 95% interval, retrieval, attribution, style,
    latency and cost."""
    metric = report["metric"]
    head = f"| strategy | split | n | {metric} (95% CI) | recall@k | attribution | style | p50 ms | p95 ms | $/1k queries |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, s in ordered(report["strategies"]):
        for split, summary in [("all", s), *s["by_split"].items()]:
            lines.append(f"| {name} | {split} | {summary['n']} | {fmt(summary, metric)} | {fmt(summary, 'recall')} | "
                         f"{fmt(summary, 'attribution')} | {fmt(summary, 'style')} | {s['latency_ms']['p50']} | "
                         f"{s['latency_ms']['p95']} | {s['cost_per_1k_usd']} |")
    return "\n".join(lines)


def ordered(strategies: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(n, strategies[n]) for n in ORDER if n in strategies]


def clearly_above(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """a's 95% interval lies wholly above b's."""
    return key in a and key in b and a["ci"][key][0] > b["ci"][key][1]


def recommend(report: dict[str, Any], ev: EvaluateConfig) -> list[str]:
    """The recommendation first, then the measured reasons behind it."""
    metric, s = report["metric"], report["strategies"]
    reasons = []
    changed = {n: x["by_split"]["changed"] for n, x in s.items() if "changed" in x["by_split"]}
    if "finetuned" in changed and "hybrid" in changed and clearly_above(changed["hybrid"], changed["finetuned"], metric):
        reasons.append(f"facts that changed after fine-tuning: the fine-tuned model alone is stale "
                       f"({fmt(changed['finetuned'], metric)}) where retrieval keeps it current "
                       f"({fmt(changed['hybrid'], metric)})")
    if "hybrid" in s and "rag" in s and clearly_above(s["hybrid"], s["rag"], "style"):
        reasons.append(f"the house style comes from fine-tuning: hybrid {fmt(s['hybrid'], 'style')} vs "
                       f"rag {fmt(s['rag'], 'style')}")
    candidates = dict(s)
    if ev.need_attribution:
        candidates = {n: x for n, x in candidates.items() if "attribution" in x} or candidates
        reasons.append("answers must cite sources (evaluate.need_attribution): only retrieval strategies can")
    if ev.facts_change != "rarely" and changed:
        candidates = {n: x for n, x in candidates.items() if n in changed} or candidates
    if ev.latency_budget_ms:
        within = {n: x for n, x in candidates.items() if x["latency_ms"]["p95"] <= ev.latency_budget_ms}
        if not within:
            reasons.append(f"no strategy meets the p95 budget of {ev.latency_budget_ms:.0f} ms on this machine")
        candidates = within or candidates
    basis = "changed" if ev.facts_change != "rarely" else "static"
    split_of = lambda n: candidates[n]["by_split"].get(basis, candidates[n])  # noqa: E731
    top = max(candidates, key=lambda n: split_of(n)[metric])
    # strategies whose interval reaches the best one's are as good, as far as this QA set can tell:
    # of those, the one with the house style, then the cheapest
    tied = [n for n in candidates if split_of(n)["ci"][metric][1] >= split_of(top)["ci"][metric][0]]
    best = max(tied, key=lambda n: (candidates[n].get("style", 0), -candidates[n]["cost_per_1k_usd"], split_of(n)[metric]))
    where = f"on {basis} facts" if basis in candidates[best]["by_split"] else "overall"
    head = (f"recommendation: {best} ({metric} {where} {split_of(best)[metric]:.2f}, "
            f"p95 {candidates[best]['latency_ms']['p95']} ms, ${candidates[best]['cost_per_1k_usd']} per 1k queries)")
    return [head, *reasons]


def bar_chart(title: str, groups: list[tuple[str, list[tuple[str, float, float | None, float | None]]]],
              ymax: float, unit: str = "") -> str:
    """Grouped bars with optional interval whiskers, as an inline SVG."""
    width, height, left, bottom, top = 640, 260, 50, 40, 30
    plot_h = height - bottom - top
    n_bars = max(1, sum(len(bars) for _, bars in groups)) + len(groups)
    bar_w = (width - left - 20) / n_bars
    y = lambda v: top + plot_h * (1 - min(v, ymax) / ymax) if ymax else top + plot_h  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#333"/>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{ymax:g}{unit}</text>',
             f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>']
    x = left + bar_w / 2
    for label, bars in groups:
        start = x
        for series, value, lo, hi in bars:
            colour = SPLIT_COLOURS.get(series, "#888")
            parts.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar_w * 0.9:.1f}" height="{top + plot_h - y(value):.1f}" '
                         f'fill="{colour}"><title>{html.escape(f"{label} {series}: {value:g}{unit}")}</title></rect>')
            if lo is not None and hi is not None:
                cx = x + bar_w * 0.45
                parts.append(f'<line x1="{cx:.1f}" y1="{y(lo):.1f}" x2="{cx:.1f}" y2="{y(hi):.1f}" stroke="#000"/>')
            x += bar_w
        parts.append(f'<text x="{(start + x) / 2:.1f}" y="{height - 22}" text-anchor="middle">{html.escape(label)}</text>')
        x += bar_w
    legend = sorted({series for _, bars in groups for series, *_ in bars})
    for i, series in enumerate(legend):
        parts.append(f'<rect x="{left + i * 90}" y="{height - 14}" width="10" height="10" fill="{SPLIT_COLOURS.get(series, "#888")}"/>'
                     f'<text x="{left + i * 90 + 14}" y="{height - 5}">{html.escape(series)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def charts(report: dict[str, Any]) -> list[str]:
    metric, strategies = report["metric"], ordered(report["strategies"])
    accuracy = [(name, [(split, x[metric], *x["ci"][metric]) for split, x in (s["by_split"] or {"all": s}).items()])
                for name, s in strategies]
    slowest = max(s["latency_ms"]["p95"] for _, s in strategies) or 1
    latency = [(name, [("p50", s["latency_ms"]["p50"], None, None), ("p95", s["latency_ms"]["p95"], None, None)])
               for name, s in strategies]
    costliest = max(s["cost_per_1k_usd"] for _, s in strategies) or 1
    cost = [(name, [("all", s["cost_per_1k_usd"], None, None)]) for name, s in strategies]
    return [bar_chart(f"{metric} by strategy and split (95% CI)", accuracy, 1.0),
            bar_chart("latency per query (retrieval + generation)", latency, slowest * 1.1, " ms"),
            bar_chart("serving cost per 1k queries at the measured throughput", cost, costliest * 1.1, " $")]


def to_html(report: dict[str, Any]) -> str:
    rows = "".join(f"<li>{html.escape(line)}</li>" for line in report["recommendation"][1:])
    lines = table(report).splitlines()
    table_rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
        for line in lines[2:])
    header = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[0].strip("|").split("|"))
    one_off = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in report["one_off"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tunedex report {html.escape(report['release_id'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:12px}}</style>
</head><body><h1>Fine-tune, RAG or both: {html.escape(report['release_id'])}</h1>
<p>QA set <code>{html.escape(report['qa_file'])}</code>, {report['n']} questions, measured {html.escape(report['created_at'])}
on this machine.</p><h2>{html.escape(report['recommendation'][0])}</h2><ul>{rows}</ul>
{''.join(charts(report))}
<h2>Figures</h2><table><tr>{header}</tr>{table_rows}</table>
<h2>One-off costs</h2><ul>{one_off}</ul></body></html>"""


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(report, indent=2))
    html_path.write_text(to_html(report), encoding="utf-8")
    return json_path, html_path
