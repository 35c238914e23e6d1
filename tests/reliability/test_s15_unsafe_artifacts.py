"""S15: unsafe model artifacts and path traversal are refused before anything is read or run.

A pickled `pytorch_model.bin` whose unpickling would create a file, a config with `auto_map` (remote code),
traversal paths for the corpus, the model and the checkpoints, a symlink out of the corpus root, a DeepSpeed
shard altered after save and a checkpoint outside the run dir. An audit hook (`sys.addaudithook`) records every
`open` of the test process, to show the targets are never opened; subprocesses run the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import run_cli, sets, write_config
from reliability.test_s06_finetune_worker_kill import registered_checkpoints, summary, train_workers, tunedex
from tunedex.infra import registry
from tunedex.infra.config import CorpusConfig, FinetuneConfig, TunedexConfig
from tunedex.infra.generation import load_generator
from tunedex.workers import base_model as bm, checkpoints as ck, finetune as ft
from tunedex.workers.sources import load_documents

TARGET = "/etc/passwd"
TRAVERSALS = ["../../etc/passwd", "/etc/passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2f..%2fetc%2fpasswd"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

_opened: list[str] | None = None
_in_hook = threading.local()
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if event != "open" or _opened is None or getattr(_in_hook, "on", False) or isinstance(args[0], int):
        return
    _in_hook.on = True
    try:
        _opened.append(os.path.realpath(os.fsdecode(args[0])))
    finally:
        _in_hook.on = False


@contextmanager
def opened_files():
    """Every path this process opens inside the block, resolved (an audit hook cannot be removed: it idles)."""
    global _opened, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


class OpenOnLoad:
    """Unpickled, this runs `open(path, "w")`: a stand-in for whatever code a pickled checkpoint can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


EXAMPLES = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(40)]


def tiny_model_dir(path: Path) -> Path:
    """A complete, safe exported model (safetensors, config, tokenizer) to spoil."""
    tok = bm.train_tokenizer([json.dumps(e) for e in EXAMPLES], 400)
    spec = bm.model_spec(FinetuneConfig(tiny={"n_embd": 32, "n_head": 2, "vocab_size": 400}, max_length=64), tok)
    bm.build_model(spec).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def finetune_cfg(tmp_path: Path, **finetune) -> TunedexConfig:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return TunedexConfig(data_dir=str(tmp_path / "data"), finetune={"train_file": str(train), **finetune})


@pytest.mark.scenario("S15", "(a) a model dir with only a pytorch_model.bin whose unpickling would create a file")
def test_pickled_weights_are_refused_everywhere_and_never_unpickled(tmp_path, record_property):
    marker, control = tmp_path / "PWNED", tmp_path / "control-PWNED"
    torch.save({"lm_head.weight": OpenOnLoad(control)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)  # the payload is live: loading it runs code
    assert control.exists()
    pickled = tiny_model_dir(tmp_path / "pickled")
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save({"lm_head.weight": OpenOnLoad(marker)}, pickled / "pytorch_model.bin")
    refusals = {}
    with pytest.raises(registry.RegistryError, match="safetensors") as exc:  # promote / a release's start
        registry.check_model_dir(pickled)
    refusals["check_model_dir"] = str(exc.value)
    with pytest.raises(registry.RegistryError, match="safetensors"):  # the serving Generator's load
        load_generator(str(pickled))
    with pytest.raises(bm.BaseModelError, match="safetensors") as exc:  # a fine-tune from this base model
        ft.main(finetune_cfg(tmp_path, base_model=str(pickled)))
    refusals["finetune"] = str(exc.value)
    with pytest.raises(OSError, match="safetensors"):  # the worker's own load, were the driver's check skipped
        bm.build_model({"path": str(pickled), "trust_remote_code": False})
    config = write_config(tmp_path / "t.yaml", tmp_path / "data")
    promote = run_cli("promote", "--model", str(pickled), "-c", str(config), cwd=tmp_path, check=False)
    assert promote.returncode == 1 and "safetensors" in promote.stderr and "Traceback" not in promote.stderr
    assert not marker.exists()
    record_property("held", f"payload proven live on a control copy; refused by promote (CLI exit 1), serving load, "
                            f"fine-tune base and the worker load; no marker file. Message: {refusals['check_model_dir'][-90:]}")


@pytest.mark.scenario("S15", "(b) a model whose config.json / tokenizer_config.json has auto_map, trust_remote_code false")
@pytest.mark.parametrize("meta", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused_naming_trust_remote_code(tmp_path, meta, record_property):
    marker = tmp_path / "IMPORTED"
    remote = tiny_model_dir(tmp_path / "remote")
    (remote / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    raw = json.loads((remote / meta).read_text())
    raw["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilLM", "AutoConfig": "evil_model.EvilConfig",
                       "AutoTokenizer": ["evil_model.EvilTokenizer", None]}
    (remote / meta).write_text(json.dumps(raw))
    with pytest.raises(registry.RegistryError, match="trust_remote_code") as exc:
        registry.check_model_dir(remote)
    with pytest.raises(registry.RegistryError, match="trust_remote_code"):
        load_generator(str(remote))
    with pytest.raises(bm.BaseModelError, match="trust_remote_code") as fexc:
        ft.main(finetune_cfg(tmp_path, base_model=str(remote)))
    assert not marker.exists()
    record_property("held", f"{meta} auto_map: refused by promote/serving ({str(exc.value)[-70:]}) and by the "
                            f"fine-tune ({str(fexc.value)[-60:]}); the custom code never ran")


@pytest.fixture
def two_below_root(monkeypatch):
    """The cwd two levels below /, so that ../../etc/passwd is /etc/passwd."""
    cwd = Path(tempfile.mkdtemp(dir="/tmp"))
    monkeypatch.chdir(cwd)
    assert os.path.realpath("../../etc/passwd") == TARGET
    yield cwd
    shutil.rmtree(cwd, ignore_errors=True)


@pytest.mark.scenario("S15", "(c) corpus, model, base-model, run-name and checkpoint paths ../../etc/passwd, /etc/passwd, %2e%2e%2f...")
def test_traversal_paths_are_refused_before_any_read(two_below_root, tmp_path, record_property):
    storage = tmp_path / "ray_results"
    storage.mkdir()
    refused = 0
    with opened_files() as opened:
        for p in TRAVERSALS:
            with pytest.raises(FileNotFoundError, match="corpus .* is not a directory"):
                load_documents(Path(p), CorpusConfig())
            with pytest.raises(registry.RegistryError, match="model dir"):
                registry.check_model_dir(Path(p))
            with pytest.raises(registry.RegistryError, match="model dir"):
                load_generator(p)
            with pytest.raises(bm.BaseModelError, match="finetune.base_model"):
                bm.check_base_model(FinetuneConfig(base_model=p))
            with pytest.raises(ck.CheckpointError, match="finetune.ray.run_name .* is not a plain name"):
                ck.run_dir(storage, p)
            with pytest.raises(ck.CheckpointError, match="finetune.ray.run_name"):
                ft.main(finetune_cfg(tmp_path, ray={"run_name": p}))
            refused += 6
        # a run dir and a checkpoint that link out of the storage root; a marker that names a file outside
        (storage / "linked-run").symlink_to("/etc")
        with pytest.raises(ck.CheckpointError, match="outside the storage root"):
            ck.run_dir(storage, "linked-run")
        run = storage / "run"
        run.mkdir()
        (run / "checkpoint_2026-01-01_00-00-00.000000").symlink_to("/etc")
        with pytest.raises(ck.CheckpointError, match="points outside the run dir"):
            ck.check_resume_point(run, world=1)
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        rel = os.path.relpath(TARGET, ckpt)
        (ckpt / ck.MARKER.format(rank=0)).write_text(json.dumps({"rank": 0, "world": 1, "step": 5, "files": {rel: "0" * 64}}))
        with pytest.raises(ck.CheckpointError, match="outside the checkpoint"):
            ck.verify_checkpoint(ckpt, world=1)
        refused += 3
    assert opened, "the audit hook saw nothing: it is not recording"
    assert TARGET not in opened and not any(o.startswith("/etc/") for o in opened)
    record_property("held", f"{refused} traversal attempts (4 spellings x corpus/model/serving load/base model/run "
                            f"name/fine-tune, plus linked run dir, linked checkpoint, doctored marker) refused; "
                            f"{len(opened)} opens audited, none of /etc/passwd")


@pytest.mark.scenario("S15", "(c) a symlink inside the corpus root to a file and a dir outside it")
def test_a_symlink_out_of_the_corpus_is_skipped_reported_and_never_opened(tmp_path, record_property):
    outside, corpus = tmp_path / "outside", tmp_path / "corpus"
    outside.mkdir()
    corpus.mkdir()
    secret = outside / "secret.md"
    secret.write_text("SECRET-S15 do not index\n")
    (outside / "deeper.md").write_text("SECRET-S15 deeper\n")
    (corpus / "ok.md").write_text("Shipping is free over 50 euros.\n")
    (corpus / "leak.md").symlink_to(secret)
    (corpus / "linked").symlink_to(outside, target_is_directory=True)
    with opened_files() as opened:
        docs, skipped = load_documents(corpus, CorpusConfig())
    assert [d.doc_id for d in docs] == ["ok.md"] and not any("SECRET" in d.text for d in docs)
    reasons = {s.doc_id: s.reason for s in skipped}
    assert "leak.md" in reasons and "outside the corpus root" in reasons["leak.md"], reasons
    assert str(secret) not in opened and str(outside / "deeper.md") not in opened
    assert str(corpus / "ok.md") in opened  # the hook records this process's reads
    record_property("held", f"1 doc indexed; skipped and reported: {sorted(reasons)} ({reasons['leak.md'][:50]}...); "
                            "the outside files were never opened")


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.scenario("S15", "(d) a DeepSpeed shard altered after save; a checkpoint linked outside the run dir; the export")
def test_an_altered_or_outside_checkpoint_is_refused_and_the_export_is_safetensors_only(stack, tmp_path, record_property):
    path, cfg = stack
    name = "s15-altered"
    run = cfg.data_dir.resolve() / "ray_results" / name
    args = ["finetune.max_steps=20", "finetune.save_steps=5", "finetune.logging_steps=5", f"finetune.ray.run_name={name}"]
    proc = tunedex(stack, *args)
    deadline = time.monotonic() + 300
    while not [c for c in registered_checkpoints(run) if c["step"]] and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # the driver: the run stops with its checkpoint(s) on disk
    proc.communicate(timeout=60)
    while train_workers(cfg) and time.monotonic() < deadline:
        time.sleep(1)
    ckpt = max((c for c in registered_checkpoints(run) if c["step"]), key=lambda c: c["step"])
    shard = next(ckpt["dir"].rglob("zero_pp_rank_1_*optim_states.pt"))
    original = shard.read_bytes()
    flip_a_byte(shard)
    started = time.monotonic()
    altered = run_cli("finetune", str(path), *sets(*args), cwd=path.parent, check=False)
    took = time.monotonic() - started
    assert altered.returncode == 1, altered.stdout[-2000:] + altered.stderr[-2000:]
    assert f"checkpoint file {shard} is missing or altered (hash mismatch); not loading it" in altered.stderr
    assert "RayTrainWorker" not in altered.stdout + altered.stderr and "Traceback" not in altered.stderr  # no worker ran
    shard.write_bytes(original)
    away = tmp_path / ckpt["dir"].name
    shutil.move(ckpt["dir"], away)
    ckpt["dir"].symlink_to(away, target_is_directory=True)
    outside = run_cli("finetune", str(path), *sets(*args), cwd=path.parent, check=False)
    assert outside.returncode == 1 and "points outside the run dir" in outside.stderr, outside.stderr[-2000:]
    ckpt["dir"].unlink()
    shutil.move(away, ckpt["dir"])
    m = summary(run_cli("finetune", str(path), *sets(*args), cwd=path.parent).stdout)  # restored: resumes
    assert m.group(2) == "20" and m.group(3) == str(ckpt["step"])
    out = Path(m.group(6))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} & PICKLE_SUFFIXES == set(), files
    assert (out / "model.safetensors").is_file() and (out / "base" / "model.safetensors").is_file()
    registry.check_model_dir(out)
    record_property("held", f"flipped 1 byte of {shard.name}: resume refused in {took:.0f}s (hash mismatch, no step run); "
                            f"checkpoint linked outside the run dir refused; restored: resumed at step {ckpt['step']}; "
                            f"export has {len(files)} files, weights only .safetensors")
