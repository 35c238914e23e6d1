"""What a fine-tune submission checks around the training itself: settings the cluster cannot run (before any
worker starts) and, when Ray Train gives up, one message that says what the workers died of and how to go on."""

from __future__ import annotations

import re

from tunedex.infra.config import TunedexConfig
from tunedex.infra.errors import TunedexError


class FinetuneError(TunedexError, ValueError):
    """Bad training input or settings; the message names the thing and the fix."""


def preflight(cfg: TunedexConfig, n_train: int) -> None:
    """Settings the hardware cannot run fail here, before any worker starts (and before Ray waits forever)."""
    import ray

    ft = cfg.finetune
    problems = []
    if ft.bf16 is True and not ft.ray.use_gpu:
        problems.append("finetune.bf16: true needs GPUs (ray.use_gpu: true); on CPU training runs in fp32: set bf16: auto")
    if ft.offload_optimizer and not ft.ray.use_gpu:
        problems.append("finetune.offload_optimizer offloads GPU optimizer state to CPU; it needs ray.use_gpu: true")
    if ft.offload_optimizer and ft.deepspeed == "zero0":
        problems.append("finetune.offload_optimizer needs ZeRO stage 1, 2 or 3 (finetune.deepspeed)")
    have = ray.cluster_resources()
    need = {k: v * ft.ray.num_workers for k, v in ft.ray.resources_per_worker.items()}
    if ft.ray.use_gpu:
        need["GPU"] = max(need.get("GPU", 0), ft.ray.num_workers)
    for res, amount in need.items():
        if have.get(res, 0) < amount:
            problems.append(
                f"finetune.ray: {ft.ray.num_workers} workers need {amount:g} {res} but the cluster has "
                f"{have.get(res, 0):g}; lower ray.num_workers or resources_per_worker"
            )
    if n_train < ft.ray.num_workers * ft.per_device_train_batch_size:
        problems.append(
            f"{n_train} training sequences are fewer than one micro-batch per worker "
            f"({ft.ray.num_workers} x {ft.per_device_train_batch_size}); add data or lower per_device_train_batch_size"
        )
    if problems:
        raise FinetuneError("cannot start training:\n  - " + "\n  - ".join(problems))


def training_failure(run_name: str, exc: Exception, max_failures: int, resume_step: int) -> str:
    """One message for a run Ray Train gave up on: what the workers died of, and how to go on."""
    text = "\n".join([str(exc), *map(str, (getattr(exc, "worker_failures", None) or {}).values())])
    ours = re.search(r"(?:Finetune|Checkpoint|BaseModel)Error: (.+)", text)  # our own refusal says it all
    died = re.search(r"The actor (is dead|died)[^.]*\.", text)
    cause = (ours.group(1).strip() if ours else f"a worker died ({died.group(0)})" if died
             else text.strip().splitlines()[-1][:300])
    resume = (f"resumes from its last checkpoint (step {resume_step})" if resume_step
              else "starts from step 0 (no complete checkpoint was written)")
    return (f"training run {run_name} failed after the {max_failures} restart(s) finetune.ray.max_failures allows: "
            f"{cause}. Fix the cause; submitting run {run_name} again {resume} (a higher finetune.ray.max_failures "
            "restarts the workers by itself)")
