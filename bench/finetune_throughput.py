"""Fine-tuning throughput: our job vs a plain transformers `Trainer` as tutorials write it, in one run.

    pip install -e ".[bench]"; python bench/finetune_throughput.py     # writes bench/results/finetune_throughput.json

Both train the same tiny GPT-2 on the same data (the demo's training set rendered as text), on this
machine. Reported: non-pad tokens per second of training (steady state: model building and Ray start-up
excluded on both sides) and their ratio (target >= 1.5x), plus the end-to-end wall time of each, and
the peak resident memory per worker of our job for ZeRO 0, 2 and 3.
The baseline pads every record to max_length (`padding="max_length"`), as the usual tutorial does.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tunedex.demo_data import write_demo_data
from tunedex.infra import services
from tunedex.infra.services import free_port
from tunedex.infra.config import load_config
from tunedex.infra.logs import setup_logging


def baseline(train_file: Path, tokenizer, spec: dict, max_length: int, epochs: float, out: Path) -> dict:
    """The tutorial: a datasets.Dataset of `text`, padded to max_length, TrainingArguments defaults."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from tunedex.workers.base_model import build_model

    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=max_length, padding="max_length"),
        batched=True, remove_columns=["text"],
    )
    non_pad = sum(sum(m) for m in ds["attention_mask"])
    started = time.perf_counter()
    model = build_model(spec)
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=4,
                             learning_rate=5e-5, report_to=[], save_strategy="no", logging_steps=50,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    result = trainer.train()
    wall = time.perf_counter() - started
    tokens = non_pad * epochs
    return {"tokens_per_s": tokens / result.metrics["train_runtime"], "train_s": result.metrics["train_runtime"],
            "wall_s": wall, "non_pad_tokens": tokens, "padded_tokens": len(ds) * max_length * epochs}


def ours(cfg, stage: str, steps: int, run: str) -> dict:
    from tunedex.workers.finetune import main

    cfg = cfg.model_copy(deep=True)
    cfg.finetune.deepspeed = stage
    cfg.finetune.max_steps = steps
    started = time.perf_counter()
    res = main(cfg, run_name=run)
    return {"tokens_per_s": res.tokens_per_s, "wall_s": time.perf_counter() - started,
            "peak_rss_mb_per_worker": res.peak_rss_mb, "final_loss": res.losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/finetune_throughput.json"))
    args = parser.parse_args()
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = write_demo_data(tmp / "demo")
        cfg = load_config(Path("configs/local.yaml"), [
            f"data_dir={tmp / 'data'}", f"ray.address=127.0.0.1:{free_port()}", f"ray.dashboard_port={free_port()}",
            f"ray.client_server_port={free_port()}", f"finetune.train_file={demo['train']}", "finetune.packing=true",
            "finetune.eval_ratio=0", "finetune.save_steps=100000", "finetune.logging_steps=100000",
        ])
        os.environ.update(services.ray_env(cfg))  # before anything imports ray: it reads these once
        from tunedex.workers import base_model as bm
        from tunedex.workers import sft_data

        rows = sft_data.load_examples(demo["train"])
        tokenizer = bm.prepare_tokenizer(cfg.finetune, rows)
        spec = bm.model_spec(cfg.finetune, tokenizer)
        base = baseline(demo["train"], tokenizer, spec, cfg.finetune.max_length, args.epochs, tmp / "hf")

        # same number of non-pad tokens for our job: steps x (workers x micro-batch) packed sequences
        examples, _ = sft_data.prepare(rows, tokenizer, cfg.finetune.max_length, True, "truncate")
        per_step = sum(len(s.input_ids) for s in sft_data.pack(examples, cfg.finetune.max_length))
        per_step = per_step / len(sft_data.pack(examples, cfg.finetune.max_length)) * cfg.finetune.ray.num_workers \
            * cfg.finetune.per_device_train_batch_size
        steps = max(10, round(base["non_pad_tokens"] / per_step))
        services.start_ray(cfg)
        try:
            with services.connect_ray(cfg):
                runs = {stage: ours(cfg, stage, steps, f"bench-{stage}") for stage in ("zero2", "zero0", "zero3")}
        finally:
            services.stop_ray(cfg)
    result = {
        "baseline_hf_trainer": base, "ours": runs, "our_steps": steps,
        "throughput_ratio_zero2": runs["zero2"]["tokens_per_s"] / base["tokens_per_s"],
        "wall_ratio_zero2": base["wall_s"] / runs["zero2"]["wall_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"non-pad tokens/s, ours (ZeRO-2, 2 workers, packing) / HF Trainer tutorial = "
          f"{result['throughput_ratio_zero2']:.2f}x (target >= 1.5x); end-to-end wall, HF / ours = "
          f"{result['wall_ratio_zero2']:.2f}x")
    for stage, r in runs.items():
        print(f"{stage}: peak RSS per worker {r['peak_rss_mb_per_worker']} MiB, {r['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()
