"""DeepSpeed fine-tuning on one real GPU: our training loop (`workers.finetune.train`) with bf16 and
ZeRO 0/2/3, a checkpoint and a resume, and the safetensors export, on a GPT-2-small-sized model.

    python bench/gpu_finetune_check.py OUT_DIR          # one GPU; prints one JSON line per stage
    python bench/gpu_finetune_check.py OUT_DIR --cpu-smoke   # the same path on CPU with a 2-layer model

Ray Train is not in this path: the device machine has no Ray and its wheel is over what can be
carried there, so a single-process world (NCCL) stands in for Ray Train's worker group; the loop,
the data, the DeepSpeed config and the checkpoint format are the ones `tunedex finetune` uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


class LocalIO:
    """Checkpoints and the export go to a local dir, the newest one is resumed from."""

    def __init__(self, root: Path):
        self.root = root
        self.saved: list[Path] = []

    def latest(self):
        return contextlib.nullcontext(str(self.saved[-1])) if self.saved else None

    def report(self, metrics, directory=None) -> None:
        if directory:
            dest = self.root / f"checkpoint_{len(list(self.root.glob('checkpoint_*'))):03d}"
            shutil.copytree(directory, dest)
            self.saved.append(dest)


def main(out: Path, smoke: bool) -> None:
    """`smoke`: the same script on CPU with a 2-layer model, to check it before spending GPU time."""
    import torch
    import torch.distributed as dist

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    if not smoke:
        torch.cuda.set_device(0)
    dist.init_process_group("gloo" if smoke else "nccl")
    from tunedex.demo_data import write_demo_data
    from tunedex.infra.config import FinetuneConfig
    from tunedex.workers import base_model as bm, finetune as ft
    from tunedex.workers import sft_data

    tmp = Path(tempfile.mkdtemp())
    demo = write_demo_data(tmp / "demo", n_products=20 if smoke else 400)
    rows = sft_data.load_examples(demo["train"])
    base = FinetuneConfig(
        tiny={"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 8000}, max_length=1024, packing=True,
        per_device_train_batch_size=8, learning_rate=3e-4, warmup_steps=10, max_steps=60, save_steps=30,
        eval_ratio=0.05, eval_steps=30, logging_steps=20, bf16=True, ray={"use_gpu": True, "num_workers": 1},
    )
    if smoke:
        small = base.tiny.model_copy(update={"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000})
        base = base.model_copy(update={"tiny": small, "max_length": 256, "max_steps": 6, "save_steps": 3,
                                       "eval_steps": 3, "warmup_steps": 2})
    tokenizer = bm.prepare_tokenizer(base, rows)
    examples, stats = sft_data.prepare(rows, tokenizer, base.max_length, True, "truncate")
    train, held_out = sft_data.split(examples, base.eval_ratio, 0)
    train_seqs, eval_seqs = sft_data.pack(train, base.max_length), sft_data.pack(held_out, base.max_length)
    device = "cpu (smoke)" if smoke else torch.cuda.get_device_name(0)
    results = {"gpu": device, "torch": torch.__version__, "examples": stats.examples,
               "train_sequences": len(train_seqs)}
    for stage in ("zero0", "zero2", "zero3"):
        cfg = base.model_copy(update={"deepspeed": stage})
        io = LocalIO(out / stage)
        (out / stage).mkdir(parents=True, exist_ok=True)
        if not smoke:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        metrics = ft.train(ft.loop_config(cfg, tokenizer, train_seqs, eval_seqs, bf16=not smoke), 0, 1, io)
        row = {"stage": stage, "tokens_per_s": round(metrics["tokens_per_s"]), "wall_s": round(time.perf_counter() - started, 1),
               "peak_gpu_mem_gib": 0 if smoke else round(torch.cuda.max_memory_allocated() / 2**30, 2),
               "loss_first": round(metrics["losses"][0], 3), "loss_last": round(metrics["losses"][-1], 3),
               "eval_losses": metrics["eval_losses"], "checkpoints": len(io.saved)}
        export = io.saved[-1]
        row["export"] = sorted(p.name for p in export.iterdir())
        if stage == "zero2":  # resume: a second run with the same checkpoints picks up at step 30
            io.saved = io.saved[:1]
            again = ft.train(ft.loop_config(cfg, tokenizer, train_seqs, eval_seqs, bf16=not smoke), 0, 1, io)
            row["resumed_from_step"] = again["resumed_from_step"]
            row["resumed_loss_last"] = round(again["losses"][-1], 3)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(export, use_safetensors=True)
        row["export_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        results[stage] = row
        print(json.dumps(row), flush=True)
    (out / "gpu_finetune.json").write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    main(Path(args[0] if args else "bench/results/gpu"), smoke="--cpu-smoke" in sys.argv)
