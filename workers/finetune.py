"""Fine-tune a causal LM with DeepSpeed on Ray Train.

`main(cfg)` reads top to bottom: load and tokenize the data, preflight the settings against the
cluster, train on `ray.num_workers` workers (checkpointing every `save_steps`, resuming from the
last complete checkpoint after a failure or when a run of the same name is submitted again),
export safetensors + tokenizer + a model card, and register the model version.
`train_loop_per_worker` is the per-worker loop (`train`, given a frozen `LoopConfig`); what it calls is plain
Python in workers/training.py. The model it starts from is workers/base_model.py's; checkpoints and resume are
workers/checkpoints.py's; the checks before and after training are workers/run_checks.py's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from tunedex.infra.config import FinetuneConfig, TunedexConfig
from tunedex.infra.ids import content_hash
from tunedex.workers import sft_data
from tunedex.workers.base_model import build_model, export_base, model_spec, prepare_tokenizer
from tunedex.workers.checkpoints import RayTrainIO, check_resume_point, load_checkpoint, run_dir, save_checkpoint
from tunedex.workers.run_checks import FinetuneError, preflight, training_failure
from tunedex.workers.sft_data import DataError, load_examples
from tunedex.workers.training import (
    clear_stale_build_locks, deepspeed_config, evaluate, export_model, lr_lambda, micro_batches, peak_rss_per_rank,
)

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    output_dir: str
    run_name: str
    steps: int
    losses: list[float]
    eval_losses: dict[int, float]
    tokens_per_s: float
    seconds: float
    examples: int
    truncated: int
    dropped: int
    resumed_from_step: int
    peak_rss_mb: list[float]
    overflow: str = ""  # what truncation to finetune.max_length cost, and the fix (sft_data.DataStats.overflow_warning)

    @property
    def summary(self) -> str:
        first, last = self.losses[0], self.losses[-1]
        resumed = f" (resumed at step {self.resumed_from_step})" if self.resumed_from_step else ""
        evals = f", eval loss {self.eval_losses[max(self.eval_losses)]:.3f}" if self.eval_losses else ""
        return (
            f"fine-tuned {self.run_name}: {self.steps} steps{resumed}, loss {first:.3f} -> {last:.3f}{evals}, "
            f"{self.tokens_per_s:.0f} tokens/s, {self.seconds:.0f}s -> {self.output_dir}"
        ) + (f"\nwarning: {self.overflow}" if self.overflow else "")


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker's loop needs, as plain data (Ray pickles it to each worker)."""
    train: list[Any]
    eval: list[Any]
    pad_id: int
    model: dict[str, Any]  # base_model.model_spec
    deepspeed: dict[str, Any]
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    lr_scheduler_type: str
    max_steps: int
    logging_steps: int
    eval_steps: int
    save_steps: int
    seed: int
    checkpoint_upload_delay_s: float = 0.0  # finetune.ray.checkpoint_upload_delay_s, ranks >= 1


def loop_config(ft: FinetuneConfig, tokenizer: Any, train_seqs: list, eval_seqs: list, bf16: bool) -> LoopConfig:
    return LoopConfig(
        train=train_seqs, eval=eval_seqs, pad_id=tokenizer.pad_token_id, model=model_spec(ft, tokenizer),
        deepspeed=deepspeed_config(ft, bf16), learning_rate=ft.learning_rate, weight_decay=ft.weight_decay,
        warmup_steps=ft.warmup_steps, lr_scheduler_type=ft.lr_scheduler_type, max_steps=ft.max_steps,
        logging_steps=ft.logging_steps, eval_steps=ft.eval_steps, save_steps=ft.save_steps, seed=ft.seed,
        checkpoint_upload_delay_s=ft.ray.checkpoint_upload_delay_s,
    )


def train_loop_per_worker(config: dict[str, LoopConfig]) -> None:
    """Ray Train's entry on each worker."""
    import ray.train

    loop, ctx = config["loop"], ray.train.get_context()
    rank = ctx.get_world_rank()
    train(loop, rank, ctx.get_world_size(), RayTrainIO(upload_delay_s=loop.checkpoint_upload_delay_s if rank else 0.0))


def train(config: LoopConfig, rank: int, world: int, io: Any) -> dict[str, Any]:
    """The training loop of one worker; the process group is already up."""
    import deepspeed
    import torch

    for lock in clear_stale_build_locks():
        print(f"removed a stale extension build lock {lock} (left by a killed process)", flush=True)
    model = build_model(config.model)
    ds = config.deepspeed
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.warmup_steps, config.max_steps, config.lr_scheduler_type)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    state = load_checkpoint(engine, io, world) or {"step": 0, "losses": [], "eval_losses": {}}
    resumed_from = state["step"]
    shard, eval_shard = config.train[rank::world], config.eval[rank::world]
    micro, accum, max_steps = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], config.max_steps
    batches = micro_batches(shard, micro, config.seed + rank)
    for _ in range(resumed_from * accum):  # replay the data order up to the checkpoint
        next(batches)
    losses, eval_losses = list(state["losses"]), dict(state["eval_losses"])
    tokens, started = 0, time.monotonic()
    if rank == 0 and resumed_from:
        print(f"resumed from the checkpoint at step {resumed_from}", flush=True)
    for step in range(resumed_from + 1, max_steps + 1):
        step_loss = 0.0
        for _ in range(accum):
            micro_batch = next(batches)
            batch = {k: v.to(engine.device) for k, v in sft_data.collate(micro_batch, config.pad_id).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accum
            tokens += sum(len(seq.input_ids) for seq in micro_batch) * world  # non-pad tokens, all workers
        losses.append(step_loss)
        # every rank evaluates (its shard may be empty): the all-reduce inside must be called on all of them
        if config.eval and (step % config.eval_steps == 0 or step == max_steps):
            eval_losses[step] = evaluate(engine, eval_shard, micro, config.pad_id)
        if rank == 0 and (step % config.logging_steps == 0 or step == max_steps):
            elapsed = time.monotonic() - started
            eta = elapsed / (step - resumed_from) * (max_steps - step)
            ev = f" | eval loss {eval_losses[step]:.4f}" if step in eval_losses else ""
            print(f"step {step}/{max_steps} | loss {step_loss:.4f}{ev} | tokens/s {tokens / elapsed:.0f} "
                  f"| elapsed {elapsed:.0f}s | eta {eta:.0f}s", flush=True)
        if step % config.save_steps == 0 and step < max_steps:
            state = {"step": step, "losses": losses, "eval_losses": eval_losses}
            save_checkpoint(engine, io, rank, world, step, state, {"step": step, "loss": step_loss})
    metrics = {"losses": losses, "eval_losses": eval_losses, "steps": max_steps, "resumed_from_step": resumed_from,
               "tokens_per_s": tokens / (time.monotonic() - started), "peak_rss_mb": peak_rss_per_rank()}
    export_model(engine, io, rank, config.model, metrics)
    return metrics


def finished_run(cfg: TunedexConfig, run_name: str, data_hash: str) -> FinetuneResult | None:
    """A run of this name that already exported its model: submitting it again returns that result."""
    from tunedex.infra.registry import load_model

    record = load_model(cfg.registry_dir, run_name)
    if record is None:
        return None
    card = record["card"]
    if card["config"]["max_steps"] != cfg.finetune.max_steps or card["data_hash"] != data_hash:
        raise FinetuneError(
            f"run {run_name} already finished ({card['config']['max_steps']} steps on data {card['data_hash'][:8]}) "
            f"-> {record['path']}; set another finetune.ray.run_name to train again"
        )
    log.info("run %s already finished; its model is %s", run_name, record["path"])
    return FinetuneResult(**{**card["metrics"], "eval_losses": {int(k): v for k, v in card["metrics"]["eval_losses"].items()}})


def main(cfg: TunedexConfig, run_name: str | None = None) -> FinetuneResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    ft = cfg.finetune
    if ft.train_file is None:
        raise FinetuneError("finetune.train_file is not set; point it at a JSONL file (try `tunedex demo-data`)")
    run_name = run_name or ft.ray.run_name or f"ft-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    storage = (ft.ray.storage_path or cfg.data_dir / "ray_results").resolve()
    run = run_dir(storage, run_name)  # before the name is used in any path
    try:
        rows = load_examples(ft.train_file)
    except DataError as exc:
        raise FinetuneError(str(exc)) from None
    tokenizer = prepare_tokenizer(ft, rows)
    examples, stats = sft_data.prepare(rows, tokenizer, ft.max_length, ft.completion_only_loss, ft.overflow)
    train, held_out = sft_data.split(examples, ft.eval_ratio, ft.seed)
    to_seq = (lambda xs: sft_data.pack(xs, ft.max_length)) if ft.packing else (lambda xs: [sft_data.as_packed(x) for x in xs])
    train_seqs, eval_seqs = to_seq(train), to_seq(held_out)
    preflight(cfg, len(train_seqs))
    data_hash = content_hash(ft.train_file.read_bytes())
    finished = finished_run(cfg, run_name, data_hash)
    if finished:
        return finished
    resume_step = check_resume_point(run, ft.ray.num_workers)
    if resume_step:
        log.info("run %s has complete checkpoints up to step %d; it resumes from the last one Ray Train registered",
                 run_name, resume_step)
    bf16 = ft.ray.use_gpu and ft.bf16 in ("auto", True)
    too_long = stats.overflow_warning(ft.max_length, len(rows))
    if too_long:
        log.warning(too_long)
    log.info("data: %d examples (%s), %d train / %d eval sequences, %d truncated, %d dropped, %d loss tokens",
             stats.examples, stats.formats, len(train_seqs), len(eval_seqs), stats.truncated, stats.dropped,
             stats.loss_tokens)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop_config(ft, tokenizer, train_seqs, eval_seqs, bf16)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=ft.ray.num_workers, use_gpu=ft.ray.use_gpu, resources_per_worker=ft.ray.resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=ft.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ft.save_total_limit),
            # Train's print patch sends each print to stdout and to its logger (stderr): every progress line twice
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                             **({} if ft.ray.use_gpu else {"DS_ACCELERATOR": "cpu"})}},
        ),
    )
    started = time.monotonic()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        resume_step = check_resume_point(run, ft.ray.num_workers)
        raise FinetuneError(training_failure(run_name, exc, ft.ray.max_failures, resume_step)) from None
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without an exported model; see the worker logs above")
    out = (ft.output_dir or cfg.data_dir / "models" / run_name).resolve()
    result.checkpoint.to_directory(str(out))
    if not (out / "model.safetensors").is_file() and not list(out.glob("*.safetensors")):
        raise RuntimeError(f"training run {run_name} reported no exported model in {out}; see the worker logs above")
    for f in out.glob("tunedex_rank*.json"):
        f.unlink()
    tokenizer.save_pretrained(out)
    metrics = json.loads((out / "metrics.json").read_text())
    res = FinetuneResult(
        output_dir=str(out), run_name=run_name, steps=metrics["steps"], losses=metrics["losses"],
        eval_losses={int(k): v for k, v in metrics["eval_losses"].items()}, tokens_per_s=metrics["tokens_per_s"],
        seconds=round(time.monotonic() - started, 1), examples=stats.examples, truncated=stats.truncated,
        dropped=stats.dropped, resumed_from_step=metrics["resumed_from_step"], peak_rss_mb=metrics["peak_rss_mb"],
        overflow=too_long,
    )
    card = {
        "run_name": run_name, "base_model": ft.base_model, "base_model_path": export_base(ft, tokenizer, out / "base"),
        "adapter": ft.adapter, "data_file": str(ft.train_file),
        "data_hash": data_hash, "config": ft.model_dump(mode="json"),
        "final_loss": res.losses[-1], "metrics": asdict(res),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    from tunedex.infra.registry import register_model

    register_model(cfg.registry_dir, run_name, out, card)
    return res
