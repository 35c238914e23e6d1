"""Fine-tune submission: `tunedex finetune` as a Ray job, submitted once per (config, data).

The submission id is derived from the fine-tune config and the training data, so triggering the flow
again with the same inputs follows the job already submitted (or returns its finished model) instead of
training again. Ray Jobs does not deduplicate two quick submissions of one id safely (ray#31356), so the
flow reads the job first and submits only when it is absent; a duplicate-id refusal means another caller
won the race, and this one follows that job. A failed or stopped job is retried under `<id>-a2`, `-a3`...
with the same training run name, so the new job resumes from the last complete checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tunedex.flows.common import flow_config, transient
from tunedex.infra.config import TunedexConfig
from tunedex.infra.errors import TunedexError
from tunedex.infra.ids import content_hash

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class FinetuneJobFailed(TunedexError, RuntimeError):
    """The Ray job ended without a model; the message carries the end of its log."""


def submission_id(cfg: TunedexConfig) -> str:
    """Same fine-tune config (run name aside) and same training data -> same id."""
    ft = cfg.finetune
    if ft.train_file is None or not ft.train_file.is_file():
        raise FileNotFoundError(f"finetune.train_file {ft.train_file} does not exist; point it at a JSONL file")
    settings = ft.model_dump(mode="json", exclude={"ray": {"run_name"}, "output_dir": True})
    digest = content_hash(json.dumps(settings, sort_keys=True) + content_hash(ft.train_file.read_bytes()))
    return f"tunedex-ft-{digest[:16]}"


def entrypoint(cfg: TunedexConfig, config: str, overrides: list[str], run_name: str) -> str:
    """The job's command: the same `tunedex finetune` a user types, with the run name pinned."""
    python = sys.executable if cfg.ray.is_local else "python"  # a cluster runs the image's Python
    sets = [*overrides, f"finetune.ray.run_name={run_name}"]
    args = [python, "-m", "tunedex.cli", "finetune", config, *(a for kv in sets for a in ("--set", kv))]
    if cfg.ray.is_local:
        # Ray's job supervisor points the driver at the newest cluster in the machine's shared /tmp/ray, which is
        # another one when several run on one machine (two data dirs, parallel tests): pin this cluster.
        args = ["env", f"RAY_ADDRESS={cfg.ray.address}", *args]
    return " ".join(shlex.quote(a) for a in args)


def job_client(cfg: TunedexConfig) -> Any:
    """A Jobs API client carrying the cluster's token itself (Ray reads its auth settings only once, at
    import, so a process that imported Ray earlier would otherwise send none)."""
    from tunedex.infra import services

    os.environ.update(services.ray_env(cfg))
    from ray.job_submission import JobSubmissionClient

    token = cfg.ray_token_path.read_text(encoding="utf-8").strip() if cfg.ray_token_path.is_file() else ""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(f"http://{cfg.ray.host}:{cfg.ray.dashboard_port}", headers=headers)


def job_status(client: Any, job_id: str) -> str | None:
    try:
        return str(client.get_job_info(job_id).status.value)
    except RuntimeError as exc:  # the SDK's "does not exist" (a 404)
        if "does not exist" in str(exc) or "404" in str(exc):
            return None
        raise


def submit_or_follow(client: Any, base_id: str, command: str) -> tuple[str, bool]:
    """(job id, whether this call submitted it). A running or finished job under the id is followed."""
    for attempt in range(1, 100):
        job_id = base_id if attempt == 1 else f"{base_id}-a{attempt}"
        status = job_status(client, job_id)
        if status in ("FAILED", "STOPPED"):
            continue
        if status is not None:
            return job_id, False
        try:
            client.submit_job(entrypoint=command, submission_id=job_id, runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
                              metadata={"tunedex": "finetune", "run_name": base_id})
            return job_id, True
        except RuntimeError as exc:
            if "already exists" in str(exc):
                return job_id, False  # a concurrent caller submitted it first
            raise
    raise FinetuneJobFailed(f"{base_id} failed 99 times; fix the cause (see `ray job logs {base_id}-a99`)")


def follow(client: Any, job_id: str, log: Any, poll_s: float = 2.0) -> str:
    """Stream the job's log lines into `log` as its driver writes them (Ray's log tail, a websocket that closes
    when the job ends), then return its final status. A stream cut short (a dashboard restart) is said in the
    log, and the status is polled to the end."""
    async def tail() -> None:
        pending = ""
        async for piece in client.tail_job_logs(job_id):
            *lines, pending = (pending + piece).split("\n")
            for line in lines:
                if line.strip():
                    log.info(line)
        if pending.strip():
            log.info(pending)

    try:  # in a thread of its own: the caller (a Prefect task) may already run an event loop
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, tail()).result()
    except RuntimeError as exc:
        log.info(f"the log stream of job {job_id} ended early ({exc}); waiting for the job to end")
    while (status := job_status(client, job_id)) not in TERMINAL:
        time.sleep(poll_s)
    return status


@task(retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=transient)
def finetune_job_task(config: str, overrides: list[str]) -> dict[str, Any]:
    from tunedex.infra.registry import load_model

    cfg = flow_config(config, overrides)
    log = get_run_logger()
    run_name = submission_id(cfg)
    record = load_model(cfg.registry_dir, run_name)
    if record is not None:
        log.info("run %s already finished -> %s", run_name, record["path"])
        return {"job_id": None, "submitted": False, **model_summary(run_name, record)}
    client = job_client(cfg)
    job_id, submitted = submit_or_follow(client, run_name, entrypoint(cfg, config, overrides, run_name))
    log.info("%s Ray job %s (run %s)", "submitted" if submitted else "following", job_id, run_name)
    status = follow(client, job_id, log)
    record = load_model(cfg.registry_dir, run_name)
    if status != "SUCCEEDED" or record is None:
        tail = "\n".join(client.get_job_logs(job_id).splitlines()[-15:])
        raise FinetuneJobFailed(f"Ray job {job_id} ended {status} without a model; its last lines:\n{tail}")
    return {"job_id": job_id, "submitted": submitted, **model_summary(run_name, record)}


def model_summary(run_name: str, record: dict[str, Any]) -> dict[str, Any]:
    m = record["card"]["metrics"]
    evals = m.get("eval_losses") or {}
    return {"run_name": run_name, "model_path": record["path"], "steps": m["steps"], "first_loss": m["losses"][0],
            "final_loss": m["losses"][-1], "eval_loss": evals[max(evals, key=int)] if evals else None,
            "tokens_per_s": round(m["tokens_per_s"]), "train_seconds": m["seconds"]}


def summary_markdown(result: dict[str, Any]) -> str:
    keys = ["run_name", "job_id", "steps", "first_loss", "final_loss", "eval_loss", "tokens_per_s", "train_seconds",
            "model_path"]
    rows = "\n".join(f"| {k} | {result.get(k)} |" for k in keys)
    return f"### Fine-tune `{result['run_name']}`\n\n| figure | value |\n|---|---|\n{rows}\n"


@flow(name="finetune", log_prints=True)
def finetune(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Submit (or follow) the fine-tune for this config and data as a Ray job; record its model version."""
    result = finetune_job_task(config, overrides or [])
    create_markdown_artifact(key="tunedex-finetune", markdown=summary_markdown(result),
                             description="tunedex fine-tune figures")
    return result
