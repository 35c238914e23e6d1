"""The plain pieces one worker's training loop (workers/finetune.py:train) calls, in the order it calls them:
stale build locks, the DeepSpeed config and learning-rate schedule, the data order, evaluation, memory, export."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tunedex.infra.config import FinetuneConfig
from tunedex.workers import sft_data
from tunedex.workers.base_model import build_model, save_model


def clear_stale_build_locks(max_age_s: float = 300.0) -> list[Path]:
    """Remove JIT-build lock files older than `max_age_s` from torch's extension cache.

    DeepSpeed JIT-builds an op (the CPU shm all-reduce) inside `deepspeed.initialize`, under a
    plain lock file; a worker killed while holding it leaves the file behind, and every later
    run waits on it forever. A build takes seconds, so an old lock can only be stale.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cache / "torch_extensions")  # where torch builds them
    now, removed = time.time(), []
    for lock in root.glob("*/*/lock"):
        try:
            if now - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            continue
    return removed


def deepspeed_config(ft: FinetuneConfig, bf16: bool) -> dict[str, Any]:
    stage = int(ft.deepspeed.removeprefix("zero"))
    zero: dict[str, Any] = {"stage": stage}
    if ft.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": ft.per_device_train_batch_size,
        "gradient_accumulation_steps": ft.gradient_accumulation_steps,
        "gradient_clipping": ft.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(warmup: int, total: int, kind: str):
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def micro_batches(sequences: list[Any], batch_size: int, seed: int):
    """An endless, seeded stream of shuffled micro-batches over this worker's shard."""
    import random

    rng = random.Random(seed)
    order = list(range(len(sequences)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [sequences[i] for i in order[start : start + batch_size]]


def evaluate(engine: Any, sequences: list[Any], batch_size: int, pad_id: int) -> float:
    import torch
    import torch.distributed as dist

    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # NCCL reduces device tensors only
    engine.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = {k: v.to(engine.device) for k, v in sft_data.collate(sequences[start : start + batch_size], pad_id).items()}
            n = int((batch["labels"][:, 1:] != sft_data.IGNORE).sum())
            total += torch.tensor([engine(**batch).loss.item() * n, n], dtype=torch.float64, device=engine.device)
    engine.train()
    dist.all_reduce(total)
    return float(total[0] / max(total[1], 1))


def peak_rss_per_rank() -> list[float]:
    """Each worker's peak resident memory (MiB), gathered on every rank."""
    import resource

    import torch.distributed as dist

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [round(x, 1) for x in out]


def export_model(engine: Any, io: Any, rank: int, spec: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Rank 0 rebuilds the model from the full (gathered) weights and saves safetensors: the whole model, LoRA
    merged into it, or (finetune.lora.merge: false) the adapter alone."""
    import deepspeed

    module = engine.module
    # ZeRO-3 shards every parameter across ranks: gather them (on every rank) before rank 0 copies the state.
    gathered = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
    with gathered:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    # what Ray Train logs (a checkpoint's metrics carry "step"; the export's "steps"); the rest is metrics.json
    summary = {"steps": metrics["steps"], "final_loss": metrics["losses"][-1]}
    if rank != 0:
        io.report(summary)
        return
    model = build_model(spec)
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, spec, Path(tmp))
        Path(tmp, "metrics.json").write_text(json.dumps(metrics))
        io.report(summary, tmp)
