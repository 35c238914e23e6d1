"""The fine-tuning recipe on a real local Ray cluster: DeepSpeed ZeRO-2/3 with 2 CPU workers, LoRA,
resume after a killed worker, idempotent re-submission, preflight errors."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors import safe_open

from conftest import run_cli

pytestmark = pytest.mark.slow

# Recorded on the 2-core CI machine kind (tiny GPT-2, demo data, seed 0, 30 steps): ZeRO-2 and ZeRO-3
# land on the same numbers. A silent change in data, masking or optimisation moves them out of the band.
RECORDED = {"final_loss": 1.882, "eval_loss": 1.735}
BAND = 0.1


def summary(proc) -> re.Match:
    line = [x for x in proc.stdout.splitlines() if x.startswith("fine-tuned ")][-1]
    m = re.match(r"fine-tuned (\S+): (\d+) steps(?: \(resumed at step (\d+)\))?, loss ([\d.]+) -> ([\d.]+), "
                 r"eval loss ([\d.]+), \d+ tokens/s, \d+s -> (\S+)", line)
    assert m, line
    return m


def finetune(stack, *overrides, check=True):
    path, _ = stack
    return run_cli("finetune", str(path), *overrides, cwd=path.parent, check=check)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_stages_train_to_the_recorded_loss(stack, stage):
    m = summary(finetune(stack, f"finetune.deepspeed={stage}", f"finetune.ray.run_name=rec-{stage}"))
    assert m.group(2) == "30"
    assert abs(float(m.group(5)) - RECORDED["final_loss"]) < BAND, m.group(0)
    assert abs(float(m.group(6)) - RECORDED["eval_loss"]) < BAND, m.group(0)
    out = Path(m.group(7))
    card = json.loads((out / "model_card.json").read_text())
    assert card["config"]["deepspeed"] == stage and len(card["metrics"]["losses"]) == 30
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and not list(out.glob("*.bin"))


def test_resubmitting_a_finished_run_returns_it_and_a_changed_one_is_refused(stack):
    first = summary(finetune(stack, "finetune.ray.run_name=twice", "finetune.max_steps=10"))
    started = time.monotonic()
    again = summary(finetune(stack, "finetune.ray.run_name=twice", "finetune.max_steps=10"))
    assert again.group(0) == first.group(0) and time.monotonic() - started < 60
    changed = finetune(stack, "finetune.ray.run_name=twice", "finetune.max_steps=12", check=False)
    assert changed.returncode == 1 and "already finished" in changed.stderr and "run_name" in changed.stderr


def test_lora_trains_and_merges_into_plain_safetensors(stack):
    m = summary(finetune(stack, "finetune.adapter=lora", "finetune.learning_rate=1e-2", "finetune.ray.run_name=lora"))
    assert float(m.group(5)) < float(m.group(4)) - 0.5  # the adapters learned something
    out = Path(m.group(7))
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)  # merged: a plain model, servable without peft
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)


def registered_checkpoints(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_killed_worker_resumes_from_its_last_complete_checkpoint(stack):
    path, cfg = stack
    name = "killed"
    cmd = [str(Path(sys.executable).parent / "tunedex"), "finetune", str(path), "finetune.max_steps=80",
           "finetune.save_steps=10", "finetune.logging_steps=10", f"finetune.ray.run_name={name}",
           "finetune.ray.max_failures=1"]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = cfg.data_dir.resolve() / "ray_results" / name
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and killed is None and proc.poll() is None:
        if registered_checkpoints(run_dir) >= 1:  # the controller has recorded a complete checkpoint
            # this run's workers: started after it (an earlier test's may still be exiting)
            workers = [p for p in psutil.process_iter(["cmdline", "create_time"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] > started]
            if workers:
                killed = workers[-1]
                killed.kill()
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=300)
    assert killed is not None, "no worker was killed: the run ended before its second checkpoint"
    assert proc.returncode == 0, out[-3000:]
    line = [x for x in out.splitlines() if x.startswith("fine-tuned ")][-1]
    m = re.search(r"80 steps \(resumed at step (\d+)\)", line)
    assert m and int(m.group(1)) >= 10 and int(m.group(1)) % 10 == 0, line  # a checkpoint step, not 0
    card = json.loads((Path(line.rsplit(" -> ", 1)[1]) / "model_card.json").read_text())
    assert len(card["metrics"]["losses"]) == 80  # the steps before the checkpoint came from it, not from step 0
    # every checkpoint the run registered holds every rank's marker (or is the final export)
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = [run_dir / c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
    assert registered
    for ckpt in registered:
        if not (ckpt / "metrics.json").exists():
            assert {p.name for p in ckpt.glob("tunedex_rank*.json")} == {"tunedex_rank0.json", "tunedex_rank1.json"}


def test_preflight_names_settings_the_hardware_cannot_run(stack):
    started = time.monotonic()
    proc = finetune(stack, "finetune.bf16=true", "finetune.ray.num_workers=64", check=False)
    assert proc.returncode == 1 and time.monotonic() - started < 60
    assert "finetune.bf16: true needs GPUs" in proc.stderr
    assert "64 workers need 64 CPU but the cluster has" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_eval_set_smaller_than_the_worker_count_does_not_hang(stack):
    """Packed, the held-out examples fit in one sequence: one rank has none to evaluate and must still
    take part in the eval all-reduce (it once skipped it, and both ranks waited forever)."""
    path, _ = stack
    m = summary(run_cli("finetune", str(path), "finetune.packing=true", "finetune.eval_ratio=0.02",
                        "finetune.max_steps=6", "finetune.eval_steps=3", "finetune.ray.run_name=small-eval",
                        cwd=path.parent, timeout=300))
    assert m.group(2) == "6" and float(m.group(6)) > 0
