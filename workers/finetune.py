"""Fine-tune a causal LM with DeepSpeed on Ray Train.

`main(cfg)` reads top to bottom: load and tokenize the data, preflight the settings against the
cluster, train on `ray.num_workers` workers (checkpointing every `save_steps`, resuming from the
last complete checkpoint after a failure or when a run of the same name is submitted again),
export safetensors + tokenizer + a model card, and register the model version.
`train_loop_per_worker` is the per-worker loop; what it calls is plain Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunedex.infra.config import FinetuneConfig, TunedexConfig
from tunedex.infra.errors import TunedexError
from tunedex.infra.ids import content_hash
from tunedex.workers import sft_data
from tunedex.workers.sft_data import DataError, load_examples

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Saved with the tokenizer so serving renders exactly the prompt format training used.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MARKER = "tunedex_rank{rank}.json"  # one per rank: the checkpoint is complete when every rank's is there
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a run name is one directory under the storage root
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Test hook (tests/reliability/test_s07_*): read once in `main`, passed to the workers as a config value.
CHECKPOINT_PAUSE_ENV = "TUNEDEX_TEST_CHECKPOINT_PAUSE_S"


class FinetuneError(TunedexError, ValueError):
    """Bad training input or settings; the message names the thing and the fix."""


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

    @property
    def summary(self) -> str:
        first, last = self.losses[0], self.losses[-1]
        resumed = f" (resumed at step {self.resumed_from_step})" if self.resumed_from_step else ""
        evals = f", eval loss {self.eval_losses[max(self.eval_losses)]:.3f}" if self.eval_losses else ""
        return (
            f"fine-tuned {self.run_name}: {self.steps} steps{resumed}, loss {first:.3f} -> {last:.3f}{evals}, "
            f"{self.tokens_per_s:.0f} tokens/s, {self.seconds:.0f}s -> {self.output_dir}"
        )


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained here, for tiny models (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", bos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def prepare_tokenizer(ft: FinetuneConfig, examples: list[dict[str, Any]]) -> Any:
    if ft.base_model == "tiny":
        return train_tokenizer([json.dumps(ex, ensure_ascii=False) for ex in examples], ft.tiny.vocab_size)
    from transformers import AutoTokenizer

    check_base_model(ft)
    tokenizer = AutoTokenizer.from_pretrained(ft.base_model, trust_remote_code=ft.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_base_model(ft: FinetuneConfig) -> None:
    """Refuse pickle-only weights, remote code and paths that are not model dirs before anything is read."""
    path = Path(ft.base_model).expanduser()
    if not path.exists():
        if ft.base_model.startswith((".", "/", "~")) or not HUB_ID.fullmatch(ft.base_model) or ".." in ft.base_model:
            raise FinetuneError(
                f"finetune.base_model {ft.base_model!r} is neither an existing model dir nor a hub id (org/name); "
                "set it to a local Hugging Face model dir or a hub id"
            )
        return  # a hub id: from_pretrained resolves it (and fails clearly when offline)
    if not path.is_dir():
        raise FinetuneError(f"finetune.base_model {path} is not a directory; point it at a Hugging Face model dir")
    if not (path / "config.json").is_file():
        raise FinetuneError(f"finetune.base_model {path} has no config.json; point it at a Hugging Face model dir")
    if not any(path.glob("*.safetensors")):
        raise FinetuneError(
            f"finetune.base_model {path} has no *.safetensors weights; pickled .bin weights are refused "
            "(they can run code when loaded): convert the model to safetensors first"
        )
    for name in ("config.json", "tokenizer_config.json"):
        meta = path / name
        try:
            remote = meta.is_file() and bool(json.loads(meta.read_text(encoding="utf-8")).get("auto_map"))
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise FinetuneError(f"finetune.base_model {path}: {name} is not a JSON object ({exc}); fix or re-download it") from None
        if remote and not ft.trust_remote_code:
            raise FinetuneError(
                f"finetune.base_model {path} needs custom code ({name} has auto_map); review that code and set "
                "finetune.trust_remote_code: true, or use a model transformers supports natively"
            )


def model_spec(ft: FinetuneConfig, tokenizer: Any) -> dict[str, Any]:
    lora = ft.lora.model_dump() if ft.adapter == "lora" else None
    if ft.base_model != "tiny":
        return {"path": ft.base_model, "trust_remote_code": ft.trust_remote_code, "lora": lora}
    t = ft.tiny
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    if t.architecture == "gpt2":
        arch = {"gpt2": {**common, "n_layer": t.n_layer, "n_embd": t.n_embd, "n_head": t.n_head,
                         "n_positions": ft.max_length}}
    else:
        arch = {"llama": {**common, "num_hidden_layers": t.n_layer, "hidden_size": t.n_embd,
                          "num_attention_heads": t.n_head, "intermediate_size": 4 * t.n_embd,
                          "max_position_embeddings": ft.max_length}}
    return {**arch, "lora": lora, "seed": ft.seed}


def build_model(spec: dict[str, Any]) -> Any:
    """The base model (built from a config, or loaded from safetensors), wrapped in LoRA when asked."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.get("seed", 0))  # a tiny model starts from the same weights on every rank and run
    if "gpt2" in spec:
        model = GPT2LMHeadModel(GPT2Config(**spec["gpt2"]))
    elif "llama" in spec:
        model = LlamaForCausalLM(LlamaConfig(**spec["llama"]))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec["path"], use_safetensors=True, trust_remote_code=spec["trust_remote_code"]
        )
    if spec.get("lora"):
        from peft import LoraConfig, get_peft_model

        lora = spec["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
            target_modules=lora["target_modules"], task_type="CAUSAL_LM",
        ))
    return model


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


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("tunedex_rank")
    }


def verify_checkpoint(root: Path, world: int) -> dict[str, Any]:
    """Every rank's marker is there and every file it lists has its recorded hash; else refuse."""
    markers = []
    for rank in range(world):
        path = root / MARKER.format(rank=rank)
        if not path.is_file():
            raise FinetuneError(f"checkpoint {root} lacks rank {rank}'s completion marker: it is partial; not loading it")
        markers.append(json.loads(path.read_text()))
    inside = root.resolve()
    for m in markers:
        if m["world"] != world:
            raise FinetuneError(f"checkpoint {root} was written by {m['world']} workers; resume with num_workers={m['world']}")
        for rel, digest in m["files"].items():
            f = root / rel
            if not f.resolve().is_relative_to(inside):  # a doctored marker must not make us read other files
                raise FinetuneError(f"checkpoint {root} lists {rel}, outside the checkpoint; not loading it")
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
                raise FinetuneError(f"checkpoint file {f} is missing or altered (hash mismatch); not loading it")
    return markers[0]


def run_dir(storage: Path, run_name: str) -> Path:
    """Where Ray Train keeps the run's checkpoints: one plain directory under the storage root."""
    if not RUN_NAME.fullmatch(run_name) or ".." in run_name:
        raise FinetuneError(
            f"finetune.ray.run_name {run_name!r} is not a plain name; use letters, digits, '.', '-' and '_' "
            f"(it names a directory under {storage})"
        )
    run = storage / run_name
    if run.exists() and not run.resolve().is_relative_to(storage.resolve()):
        raise FinetuneError(f"run dir {run} points outside the storage root {storage} (to {run.resolve()}); "
                            "remove the link or set another finetune.ray.run_name")
    return run


def check_resume_point(run: Path, world: int) -> int:
    """The step of the newest complete checkpoint an earlier attempt of this run left (0: none), checked
    before any worker starts.

    Every complete checkpoint (every rank's marker there) must lie inside the run dir and every file must have
    its recorded hash: Ray Train restores the last one it registered, which may be older than the newest on
    disk. A partial one (a rank's marker missing: the run stopped while writing it) was never registered by
    Ray Train; it is reported and ignored.
    """
    if not run.is_dir():
        return 0
    root, step = run.resolve(), 0
    for ckpt in sorted(p for p in run.glob("checkpoint_*") if p.is_dir()):
        if not ckpt.resolve().is_relative_to(root):
            raise FinetuneError(f"checkpoint {ckpt} points outside the run dir {root} (to {ckpt.resolve()}); "
                                "not resuming from it: remove it, or set another finetune.ray.run_name")
        if (ckpt / "metrics.json").is_file():
            continue  # the final export
        markers = sorted(ckpt.glob(MARKER.format(rank="*")))
        wrote = json.loads(markers[0].read_text())["world"] if markers else world
        missing = [r for r in range(wrote) if not (ckpt / MARKER.format(rank=r)).is_file()]
        if missing:
            log.warning("ignoring partial checkpoint %s: rank %s's completion marker is missing (the run stopped "
                        "while writing it)", ckpt, missing[0])
            continue
        step = max(step, int(verify_checkpoint(ckpt, world)["step"]))
    return step


class RayTrainIO:
    """Where the loop reports metrics and checkpoints: Ray Train (the other is the GPU check's local dir).

    `upload_delay_s` (a test hook) holds this worker's checkpoint upload back, so a run can be killed
    while only the other ranks' files have landed in storage.
    """

    def __init__(self, upload_delay_s: float = 0.0):
        self.upload_delay_s = upload_delay_s

    def latest(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return None if ckpt is None else ckpt.as_directory()

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_fn=self._delayed_upload if self.upload_delay_s else None)

    def _delayed_upload(self, checkpoint: Any, dir_name: str) -> Any:
        import ray.train

        time.sleep(self.upload_delay_s)
        return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)


def save_checkpoint(engine: Any, io: Any, rank: int, world: int, step: int, state: dict[str, Any], metrics: dict) -> None:
    """All ranks save their DeepSpeed shards, each writes its marker, and `io` gathers them."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ckpt", client_state=state)
        dist.barrier()
        marker = {"rank": rank, "world": world, "step": step, "files": file_hashes(Path(tmp))}
        Path(tmp, MARKER.format(rank=rank)).write_text(json.dumps(marker))
        io.report(metrics, tmp)


def load_checkpoint(engine: Any, io: Any, world: int) -> dict[str, Any] | None:
    latest = io.latest()
    if latest is None:
        return None
    with latest as d:
        if (Path(d) / "metrics.json").is_file():
            raise FinetuneError(f"the run's last checkpoint {d} is its final export: it already finished")
        verify_checkpoint(Path(d), world)
        _, state = engine.load_checkpoint(d, tag="ckpt")
    return state


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker."""
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    io = RayTrainIO(upload_delay_s=config["checkpoint_pause_s"] if rank else 0.0)
    train(config, rank, ctx.get_world_size(), io)


def clear_stale_build_locks(max_age_s: float = 300.0) -> list[Path]:
    """Remove JIT-build lock files older than `max_age_s` from torch's extension cache.

    DeepSpeed JIT-builds an op (the CPU shm all-reduce) inside `deepspeed.initialize`, under a
    plain lock file; a worker killed while holding it leaves the file behind, and every later
    run waits on it forever. A build takes seconds, so an old lock can only be stale.
    """
    import os

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


def train(config: dict[str, Any], rank: int, world: int, io: Any) -> dict[str, Any]:
    """The training loop of one worker; the process group is already up."""
    import deepspeed
    import torch

    for lock in clear_stale_build_locks():
        print(f"removed a stale extension build lock {lock} (left by a killed process)", flush=True)
    model = build_model(config["model"])
    ds = config["deepspeed"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config["warmup_steps"], config["max_steps"], config["lr_scheduler_type"])
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    state = load_checkpoint(engine, io, world) or {"step": 0, "losses": [], "eval_losses": {}}
    resumed_from = state["step"]
    shard, eval_shard = config["train"][rank::world], config["eval"][rank::world]
    micro, accum, max_steps = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], config["max_steps"]
    batches = micro_batches(shard, micro, config["seed"] + rank)
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
            batch = {k: v.to(engine.device) for k, v in sft_data.collate(micro_batch, config["pad_id"]).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accum
            tokens += sum(len(seq.input_ids) for seq in micro_batch) * world  # non-pad tokens, all workers
        losses.append(step_loss)
        # every rank evaluates (its shard may be empty): the all-reduce inside must be called on all of them
        if config["eval"] and (step % config["eval_steps"] == 0 or step == max_steps):
            eval_losses[step] = evaluate(engine, eval_shard, micro, config["pad_id"])
        if rank == 0 and (step % config["logging_steps"] == 0 or step == max_steps):
            elapsed = time.monotonic() - started
            eta = elapsed / (step - resumed_from) * (max_steps - step)
            ev = f" | eval loss {eval_losses[step]:.4f}" if step in eval_losses else ""
            print(f"step {step}/{max_steps} | loss {step_loss:.4f}{ev} | tokens/s {tokens / elapsed:.0f} "
                  f"| elapsed {elapsed:.0f}s | eta {eta:.0f}s", flush=True)
        if step % config["save_steps"] == 0 and step < max_steps:
            state = {"step": step, "losses": losses, "eval_losses": eval_losses}
            save_checkpoint(engine, io, rank, world, step, state, {"step": step, "loss": step_loss})
    metrics = {"losses": losses, "eval_losses": eval_losses, "steps": max_steps, "resumed_from_step": resumed_from,
               "tokens_per_s": tokens / (time.monotonic() - started), "peak_rss_mb": peak_rss_per_rank()}
    export_model(engine, io, rank, config["model"], metrics)
    return metrics


def export_model(engine: Any, io: Any, rank: int, spec: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Rank 0 rebuilds the model from the full (gathered) weights, merges LoRA, saves safetensors."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank != 0:
        io.report(metrics)
        return
    model = build_model(spec)
    model.load_state_dict(state)
    if spec.get("lora"):
        model = model.merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        Path(tmp, "metrics.json").write_text(json.dumps(metrics))
        io.report(metrics, tmp)


def export_base(ft: FinetuneConfig, tokenizer: Any, out: Path) -> str:
    """Where the base model can be loaded from: a tiny base is rebuilt from its seed and saved beside the
    fine-tune (so `mode: rag` and evaluation can serve it); any other base is its own path or hub id."""
    if ft.base_model != "tiny":
        return ft.base_model
    model = build_model({**model_spec(ft, tokenizer), "lora": None})
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def loop_config(ft: FinetuneConfig, tokenizer: Any, train_seqs: list, eval_seqs: list, bf16: bool,
                checkpoint_pause_s: float = 0.0) -> dict[str, Any]:
    """Everything a worker's loop needs, as plain data."""
    return {
        "train": train_seqs, "eval": eval_seqs, "pad_id": tokenizer.pad_token_id,
        "model": model_spec(ft, tokenizer), "deepspeed": deepspeed_config(ft, bf16),
        "learning_rate": ft.learning_rate, "weight_decay": ft.weight_decay, "warmup_steps": ft.warmup_steps,
        "lr_scheduler_type": ft.lr_scheduler_type, "max_steps": ft.max_steps, "logging_steps": ft.logging_steps,
        "eval_steps": ft.eval_steps, "save_steps": ft.save_steps, "seed": ft.seed,
        "checkpoint_pause_s": checkpoint_pause_s,
    }


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


def training_failure(run_name: str, exc: Exception, max_failures: int, resume_step: int) -> str:
    """One message for a run Ray Train gave up on: what the workers died of, and how to go on."""
    text = "\n".join([str(exc), *map(str, (getattr(exc, "worker_failures", None) or {}).values())])
    ours = re.search(r"FinetuneError: (.+)", text)  # our own refusal (an altered checkpoint...) says it all
    died = re.search(r"The actor (is dead|died)[^.]*\.", text)
    cause = (ours.group(1).strip() if ours else f"a worker died ({died.group(0)})" if died
             else text.strip().splitlines()[-1][:300])
    resume = (f"resumes from its last checkpoint (step {resume_step})" if resume_step
              else "starts from step 0 (no complete checkpoint was written)")
    return (f"training run {run_name} failed after the {max_failures} restart(s) finetune.ray.max_failures allows: "
            f"{cause}. Fix the cause; submitting run {run_name} again {resume} (a higher finetune.ray.max_failures "
            "restarts the workers by itself)")


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
    log.info("data: %d examples (%s), %d train / %d eval sequences, %d truncated, %d dropped, %d loss tokens",
             stats.examples, stats.formats, len(train_seqs), len(eval_seqs), stats.truncated, stats.dropped,
             stats.loss_tokens)
    pause = float(os.environ.get(CHECKPOINT_PAUSE_ENV) or 0)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(ft, tokenizer, train_seqs, eval_seqs, bf16, checkpoint_pause_s=pause),
        scaling_config=ray.train.ScalingConfig(
            num_workers=ft.ray.num_workers, use_gpu=ft.ray.use_gpu, resources_per_worker=ft.ray.resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=ft.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ft.save_total_limit),
            worker_runtime_env={"env_vars": {} if ft.ray.use_gpu else {"DS_ACCELERATOR": "cpu"}},
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
