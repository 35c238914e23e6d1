"""Fine-tune a causal LM with DeepSpeed on Ray Train.

`main(cfg)` reads top to bottom: load examples, prepare the tokenizer, tokenize, train on
`ray.num_workers` workers, export safetensors + tokenizer + a model card. The per-worker loop
is `train_loop_per_worker`; everything it calls is plain Python.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunedex.infra.config import FinetuneConfig, TunedexConfig
from tunedex.infra.ids import content_hash

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Saved with the tokenizer so serving renders exactly the prompt format training used.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class FinetuneError(ValueError):
    """Bad training input or settings; the message names the thing and the fix."""


@dataclass
class FinetuneResult:
    output_dir: str
    run_name: str
    steps: int
    losses: list[float]
    tokens_per_s: float
    seconds: float
    examples: int
    truncated: int

    @property
    def summary(self) -> str:
        first, last = self.losses[0], self.losses[-1]
        return (
            f"fine-tuned {self.run_name}: {self.steps} steps, loss {first:.3f} -> {last:.3f}, "
            f"{self.tokens_per_s:.0f} tokens/s, {self.seconds:.0f}s -> {self.output_dir}"
        )


def load_examples(path: Path) -> list[dict[str, Any]]:
    """JSONL of {messages}, {prompt, completion} or {text}; every bad line reported with its number."""
    if not path.is_file():
        raise FinetuneError(f"training file {path} does not exist; set finetune.train_file (try `tunedex demo-data`)")
    examples, problems = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                problems.append(f"line {lineno}: not a JSON object ({exc.__class__.__name__})")
                continue
            if not (isinstance(row, dict) and _example_kind(row)):
                problems.append(f"line {lineno}: needs `messages`, `prompt`+`completion` or `text`")
                continue
            examples.append(row)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise FinetuneError(f"{path} has {len(problems)} bad line(s):\n  {shown}")
    if not examples:
        raise FinetuneError(f"{path} holds no examples; add JSONL lines with `messages`, `prompt`/`completion` or `text`")
    return examples


def _example_kind(row: dict[str, Any]) -> str | None:
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    ):
        return "messages"
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return "prompt_completion"
    if isinstance(row.get("text"), str) and row["text"].strip():
        return "text"
    return None


def render_example(row: dict[str, Any], tokenizer: Any) -> str:
    kind = _example_kind(row)
    if kind == "messages":
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if kind == "prompt_completion":
        return row["prompt"] + row["completion"] + tokenizer.eos_token
    return row["text"] + tokenizer.eos_token


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
        raw = [json.dumps(ex, ensure_ascii=False) for ex in examples]
        tokenizer = train_tokenizer(raw, ft.tiny.vocab_size)
        return tokenizer
    from transformers import AutoTokenizer

    check_base_model(ft)
    tokenizer = AutoTokenizer.from_pretrained(ft.base_model, trust_remote_code=ft.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_base_model(ft: FinetuneConfig) -> None:
    """Refuse pickle-only weights and remote code before any worker starts."""
    path = Path(ft.base_model).expanduser()
    if not path.exists():
        if ft.base_model.startswith((".", "/", "~")):
            raise FinetuneError(f"finetune.base_model {ft.base_model} does not exist; set it to a model dir or a hub id")
        return  # a hub id: from_pretrained resolves it (and fails clearly when offline)
    if not (path / "config.json").is_file():
        raise FinetuneError(f"finetune.base_model {path} has no config.json; point it at a Hugging Face model dir")
    if not any(path.glob("*.safetensors")):
        raise FinetuneError(f"finetune.base_model {path} has no *.safetensors weights; pickled .bin weights are refused")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("auto_map") and not ft.trust_remote_code:
        raise FinetuneError(
            f"finetune.base_model {path} needs custom code (auto_map); review it and set finetune.trust_remote_code: true"
        )


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per example, truncated to `max_length`; returns how many were truncated."""
    ids, truncated = [], 0
    for text in texts:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated += len(tokens) > max_length
        ids.append(tokens[:max_length])
    return ids, truncated


def model_spec(ft: FinetuneConfig, tokenizer: Any) -> dict[str, Any]:
    if ft.base_model != "tiny":
        return {"path": ft.base_model, "trust_remote_code": ft.trust_remote_code}
    t = ft.tiny
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    if t.architecture == "gpt2":
        return {"gpt2": {**common, "n_layer": t.n_layer, "n_embd": t.n_embd, "n_head": t.n_head,
                         "n_positions": ft.max_length}}
    return {"llama": {**common, "num_hidden_layers": t.n_layer, "hidden_size": t.n_embd,
                      "num_attention_heads": t.n_head, "intermediate_size": 4 * t.n_embd,
                      "max_position_embeddings": ft.max_length}}


def build_model(spec: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if "gpt2" in spec:
        return GPT2LMHeadModel(GPT2Config(**spec["gpt2"]))
    if "llama" in spec:
        return LlamaForCausalLM(LlamaConfig(**spec["llama"]))
    return AutoModelForCausalLM.from_pretrained(
        spec["path"], use_safetensors=True, trust_remote_code=spec["trust_remote_code"]
    )


def deepspeed_config(ft: FinetuneConfig, bf16: bool) -> dict[str, Any]:
    stage = int(ft.deepspeed.removeprefix("zero"))
    return {
        "train_micro_batch_size_per_gpu": ft.per_device_train_batch_size,
        "gradient_accumulation_steps": ft.gradient_accumulation_steps,
        "gradient_clipping": ft.max_grad_norm,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def collate(batch: list[list[int]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def micro_batches(examples: list[list[int]], batch_size: int, seed: int):
    """An endless stream of shuffled micro-batches over this worker's shard."""
    import random

    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    model = build_model(config["model"])
    ds = config["deepspeed"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config["warmup_steps"], config["max_steps"]))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    shard = config["examples"][rank::world]
    if len(shard) < ds["train_micro_batch_size_per_gpu"]:
        raise ValueError(f"worker {rank} has {len(shard)} examples, fewer than one micro-batch")
    batches = micro_batches(shard, ds["train_micro_batch_size_per_gpu"], config["seed"] + rank)
    accum, max_steps = ds["gradient_accumulation_steps"], config["max_steps"]
    losses, tokens, started = [], 0, time.monotonic()
    for step in range(1, max_steps + 1):
        step_loss = 0.0
        for _ in range(accum):
            batch = {k: v.to(engine.device) for k, v in collate(next(batches), config["pad_id"]).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accum
            tokens += int(batch["attention_mask"].sum()) * world
        losses.append(step_loss)
        if rank == 0 and (step % config["logging_steps"] == 0 or step == max_steps):
            elapsed = time.monotonic() - started
            eta = elapsed / step * (max_steps - step)
            print(f"step {step}/{max_steps} | loss {step_loss:.4f} | tokens/s {tokens / elapsed:.0f} "
                  f"| elapsed {elapsed:.0f}s | eta {eta:.0f}s", flush=True)
    metrics = {"losses": losses, "steps": max_steps, "tokens_per_s": tokens / (time.monotonic() - started)}
    export_model(engine, rank, metrics)


def export_model(engine: Any, rank: int, metrics: dict[str, Any]) -> None:
    """Rank 0 writes safetensors (ZeRO-3 shards gathered first) and reports them as the final checkpoint."""
    import deepspeed
    import ray.train

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        Path(tmp, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def main(cfg: TunedexConfig, run_name: str | None = None) -> FinetuneResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    ft = cfg.finetune
    if ft.train_file is None:
        raise FinetuneError("finetune.train_file is not set; point it at a JSONL file (try `tunedex demo-data`)")
    examples = load_examples(ft.train_file)
    tokenizer = prepare_tokenizer(ft, examples)
    ids, truncated = tokenize([render_example(ex, tokenizer) for ex in examples], tokenizer, ft.max_length)
    if len(ids) < ft.ray.num_workers * ft.per_device_train_batch_size:
        raise FinetuneError(
            f"{len(ids)} examples are fewer than one micro-batch per worker "
            f"({ft.ray.num_workers} x {ft.per_device_train_batch_size}); add data or lower per_device_train_batch_size"
        )
    run_name = run_name or ft.ray.run_name or f"ft-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    storage = (ft.ray.storage_path or cfg.data_dir / "ray_results").resolve()
    bf16 = ft.ray.use_gpu  # fp32 on CPU; bf16 on GPUs
    env = {} if ft.ray.use_gpu else {"DS_ACCELERATOR": "cpu"}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "examples": ids, "pad_id": tokenizer.pad_token_id, "model": model_spec(ft, tokenizer),
            "deepspeed": deepspeed_config(ft, bf16), "learning_rate": ft.learning_rate,
            "weight_decay": ft.weight_decay, "warmup_steps": ft.warmup_steps, "max_steps": ft.max_steps,
            "logging_steps": ft.logging_steps, "seed": ft.seed,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=ft.ray.num_workers, use_gpu=ft.ray.use_gpu, resources_per_worker=ft.ray.resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage), worker_runtime_env={"env_vars": env}
        ),
    )
    started = time.monotonic()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without an exported model; see the worker logs above")
    out = (ft.output_dir or cfg.data_dir / "models" / run_name).resolve()
    result.checkpoint.to_directory(str(out))
    tokenizer.save_pretrained(out)
    metrics = json.loads((out / "metrics.json").read_text())
    res = FinetuneResult(
        output_dir=str(out), run_name=run_name, steps=metrics["steps"], losses=metrics["losses"],
        tokens_per_s=metrics["tokens_per_s"], seconds=round(time.monotonic() - started, 1),
        examples=len(ids), truncated=truncated,
    )
    card = {
        "base_model": ft.base_model, "data_file": str(ft.train_file),
        "data_hash": content_hash(ft.train_file.read_bytes()), "config": ft.model_dump(mode="json"),
        "metrics": {k: v for k, v in asdict(res).items() if k != "losses"} | {"final_loss": res.losses[-1]},
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    return res

