"""The fine-tuning recipe on a real local Ray cluster: DeepSpeed ZeRO-2/3 with 2 CPU workers, LoRA,
idempotent re-submission, preflight errors (a killed worker's resume: tests/reliability/test_s06_*)."""

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import run_cli, sets

pytestmark = pytest.mark.slow

# Recorded on the 2-core CI machine kind (tiny GPT-2, demo data, seed 0, 30 steps): ZeRO-2 and ZeRO-3
# land on the same numbers. A silent change in data, masking or optimisation moves them out of the band.
RECORDED = {"final_loss": 1.971, "eval_loss": 2.015}  # re-recorded 2026-12-07 (both stages) when the demo config
# (which the tests' config starts from) turned dropout off; before: 2.190 / 2.099 with GPT-2's 0.1
BAND = 0.1


def summary(proc) -> re.Match:
    line = [x for x in proc.stdout.splitlines() if x.startswith("fine-tuned ")][-1]
    m = re.match(r"fine-tuned (\S+): (\d+) steps(?: \(resumed at step (\d+)\))?, loss ([\d.]+) -> ([\d.]+), "
                 r"eval loss ([\d.]+), \d+ tokens/s, \d+s -> (\S+)", line)
    assert m, line
    return m


def finetune(stack, *overrides, check=True):
    path, _ = stack
    return run_cli("finetune", str(path), *sets(*overrides), cwd=path.parent, check=check)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_stages_train_to_the_recorded_loss(request, stack, stage):
    # ZeRO-2 is the config's own: the README pipeline's fine-tune (tests/conftest.py, 30 steps) is that run
    proc = (request.getfixturevalue("pipeline")["finetune"] if stage == "zero2" else
            finetune(stack, f"finetune.deepspeed={stage}", f"finetune.ray.run_name=rec-{stage}"))
    m = summary(proc)
    assert m.group(2) == "30"
    assert abs(float(m.group(5)) - RECORDED["final_loss"]) < BAND, m.group(0)
    assert abs(float(m.group(6)) - RECORDED["eval_loss"]) < BAND, m.group(0)
    out = Path(m.group(7))
    card = json.loads((out / "model_card.json").read_text())
    assert card["config"]["deepspeed"] == stage and len(card["metrics"]["losses"]) == 30
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and not list(out.glob("*.bin"))


def test_resubmitting_a_finished_run_returns_it_and_a_changed_one_is_refused(stack, pipeline):
    first = summary(pipeline["finetune"])  # the README pipeline's run, resubmitted by its name
    weights = Path(first.group(7)) / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = summary(finetune(stack, f"finetune.ray.run_name={first.group(1)}", "finetune.max_steps=30"))
    assert again.group(0) == first.group(0)
    assert weights.stat().st_mtime_ns == written  # returned, not trained and exported again
    changed = finetune(stack, f"finetune.ray.run_name={first.group(1)}", "finetune.max_steps=12", check=False)
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


def test_preflight_names_settings_the_hardware_cannot_run(stack):
    proc = finetune(stack, "finetune.bf16=true", "finetune.ray.num_workers=64", check=False)
    assert proc.returncode == 1
    assert "finetune.bf16: true needs GPUs" in proc.stderr
    assert "64 workers need 64 CPU but the cluster has" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_eval_set_smaller_than_the_worker_count_does_not_hang(stack):
    """Packed, the held-out examples fit in one sequence: one rank has none to evaluate and must still
    take part in the eval all-reduce (it once skipped it, and both ranks waited forever)."""
    path, _ = stack
    m = summary(run_cli("finetune", str(path), *sets("finetune.packing=true", "finetune.eval_ratio=0.02",
                        "finetune.max_steps=6", "finetune.eval_steps=3", "finetune.ray.run_name=small-eval"),
                        cwd=path.parent, timeout=900))
    assert m.group(2) == "6" and float(m.group(6)) > 0
