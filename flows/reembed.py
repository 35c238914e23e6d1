"""The nightly re-embedding flow: an incremental index run over the configured corpus."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tunedex.flows.common import flow_config, transient


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=transient)
def index_task(config: str | None, corpus: str | None, overrides: list[str]) -> dict:
    from tunedex.workers.embed import index_corpus

    cfg = flow_config(config, overrides)
    root = cfg.corpus_root(corpus, "corpus=PATH")
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


@flow(name="corpus-watch", log_prints=True)
def corpus_watch(config: str | None = None, corpus: str | None = None, overrides: list[str] | None = None,
                 poll: bool = False, debounce_s: float = 1.0) -> None:
    """`tunedex watch` as a long-running deployment: index the corpus now and after each settled change,
    each pass logged and kept as an artifact (cancel the run to stop it). Polling for network volumes."""
    from tunedex.workers.watch import watch_corpus

    cfg = flow_config(config, overrides or [])
    root = cfg.corpus_root(corpus, "corpus=PATH")
    logger = get_run_logger()

    def on_pass(report, why: str) -> None:
        logger.info("pass after %s: %s", why, report.summary)
        create_markdown_artifact(key="tunedex-index-stats", markdown=report_markdown(asdict(report)),
                                 description=f"tunedex corpus-watch pass after {why}")

    watch_corpus(cfg, root, on_pass, debounce_s=debounce_s, poll=poll)
