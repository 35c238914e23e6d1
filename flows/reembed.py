"""The nightly re-embedding flow: an incremental index run over the configured corpus."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tunedex.flows.common import flow_config, transient


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=transient)
def index_task(config: str | None, corpus: str | None, overrides: list[str]) -> dict:
    from dataclasses import asdict

    from tunedex.workers.embed import index_corpus

    cfg = flow_config(config, overrides)
    root = Path(corpus) if corpus else cfg.corpus.path
    if root is None:
        raise ValueError("no corpus: pass corpus=PATH or set corpus.path in the config")
    report = index_corpus(cfg, root)
    get_run_logger().info(report.summary)
    return asdict(report)


def report_markdown(report: dict) -> str:
    keys = ["docs_added", "docs_changed", "docs_removed", "docs_unchanged", "docs_failed",
            "chunks_embedded", "chunks_retagged", "chunks_deleted", "chunks_total", "seconds"]
    rows = "\n".join(f"| {k} | {report[k]} |" for k in keys)
    drift = report.get("drift") or {}
    rows += "".join(f"\n| drift_{k} | {v} |" for k, v in drift.items())  # repaired store drift (docs, rows)
    return f"### Index run: `{report['collection']}`\n\n| figure | value |\n|---|---|\n{rows}\n"


@flow(name="nightly-reembed", log_prints=True)
def nightly_reembed(config: str | None = None, corpus: str | None = None, overrides: list[str] | None = None) -> dict:
    report = index_task(config, corpus, overrides or [])
    create_markdown_artifact(key="tunedex-index-stats", markdown=report_markdown(report),
                             description="tunedex nightly re-embed figures")
    return report
