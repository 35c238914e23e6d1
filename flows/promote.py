"""Evaluate a candidate release against the serving one; promote it only when the configured gate passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tunedex.flows.common import flow_config, transient

FIGURES = ("exact", "contains", "f1", "recall", "mrr", "n")


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient)
def evaluate_task(config: str, overrides: list[str], model_path: str, collection: str) -> dict[str, Any]:
    from tunedex.workers.evaluate import evaluate_release, load_qa

    cfg = flow_config(config, overrides)
    if cfg.evaluate.qa_file is None:
        raise ValueError("evaluate.qa_file is not set; the gate needs a QA set (try DIR/day1/qa.jsonl from `tunedex demo-data`)")
    items = load_qa(cfg.evaluate.qa_file, cfg.evaluate.max_questions)
    report = evaluate_release(cfg, model_path, collection, items, cfg.evaluate.strategy)
    get_run_logger().info("%s on %s: %s", model_path, collection, {k: report.get(k) for k in FIGURES})
    return report


@task(retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=transient)
def promote_task(config: str, overrides: list[str], model_path: str, collection: str, summary: dict[str, Any]) -> str:
    from tunedex.infra import registry
    from tunedex.serving.control import promote

    cfg = flow_config(config, overrides)
    release = registry.candidate_release(cfg, Path(model_path), collection, eval_report=summary)
    registry.save_release(cfg.registry_dir, release)
    promote(cfg, Path(config).resolve(), overrides, release)
    return release.release_id


def decision_markdown(candidate: dict, current: dict | None, metric: str, promoted: bool, reason: str) -> str:
    rows = "\n".join(f"| {k} | {candidate.get(k, '')} | {'' if current is None else current.get(k, '')} |"
                     for k in FIGURES)
    verdict = "promoted" if promoted else "not promoted"
    return (f"### Evaluate and promote: **{verdict}**\n\n{reason} (gate metric: `{metric}`)\n\n"
            f"| figure | candidate | serving |\n|---|---|---|\n{rows}\n")


@flow(name="evaluate-and-promote", log_prints=True)
def evaluate_and_promote(config: str, overrides: list[str] | None = None, model: str | None = None) -> dict[str, Any]:
    """Score the candidate (default: the newest registered fine-tune on the live index) and the serving
    release on `evaluate.qa_file`; promote the candidate when `workers.evaluate.gate` says so."""
    from tunedex.infra import registry
    from tunedex.workers.evaluate import gate

    overrides = overrides or []
    cfg = flow_config(config, overrides)
    latest = Path(model) if model else registry.latest_model(cfg.registry_dir)
    if latest is None:
        raise registry.RegistryError(f"no model version in {cfg.registry_dir}; run the finetune flow first")
    release = registry.candidate_release(cfg, latest)  # checks the model dir; the live collection
    model_path, collection = release.model_path, release.collection
    serving = registry.current_release(cfg.registry_dir)
    if serving and serving.model_path == model_path and serving.collection == collection:
        return {"promoted": False, "release_id": serving.release_id, "reason": "already serving this model and index"}
    candidate = evaluate_task(config, overrides, model_path, collection)
    current = evaluate_task(config, overrides, serving.model_path, serving.collection) if serving else None
    decision = gate(candidate, current, cfg.evaluate)
    summary = {k: candidate.get(k) for k in FIGURES} | {"metric": cfg.evaluate.metric, "decision": decision.reason}
    release_id = promote_task(config, overrides, model_path, collection, summary) \
        if decision.promote else (serving.release_id if serving else None)
    create_markdown_artifact(key="tunedex-promotion", description="tunedex evaluate-and-promote decision",
                             markdown=decision_markdown(candidate, current, cfg.evaluate.metric, decision.promote,
                                                        decision.reason))
    return {"promoted": decision.promote, "release_id": release_id, "reason": decision.reason,
            "candidate": {k: candidate.get(k) for k in FIGURES},
            "serving": None if current is None else {k: current.get(k) for k in FIGURES}}
