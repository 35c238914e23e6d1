"""Shared fixtures: a real local stack (Milvus Lite server + Ray head with token auth) on free ports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tunedex.demo_data import write_demo_data
from tunedex.infra import services
from tunedex.infra.config import TunedexConfig, load_config
from tunedex.infra.services import free_port

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, data_dir: Path, **sections: dict) -> Path:
    """A local config on free ports, data under `data_dir`, small enough for 2 cores."""
    raw = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    raw["data_dir"] = str(data_dir)
    raw["milvus"]["uri"] = f"http://127.0.0.1:{free_port()}"
    raw["ray"].update(address=f"127.0.0.1:{free_port()}", dashboard_port=free_port(), client_server_port=free_port(),
                      metrics_export_port=free_port())
    raw["serve"].update(port=free_port(), api_key="test-key-123", engine_kwargs={"kv_cache_memory_bytes": 128 * 2**20})
    raw["corpus"]["path"] = None
    raw["serve"]["top_k"] = 3
    # small and quick: the tests check the pipeline, not what the demo's model learns
    for key in ("packing", "eval_steps", "save_steps", "eval_ratio"):  # the schema's defaults
        raw["finetune"].pop(key, None)
    raw["finetune"].update(max_steps=30, logging_steps=10, train_file=None, max_length=256, per_device_train_batch_size=8,
                           learning_rate=2e-3, warmup_steps=10)
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args: str, cwd: Path, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    """Run `tunedex ARGS` as a user would, in its own process. The timeout only catches a hang: with busy loops on
    both cores (issue 17) the README pipeline's 30-step fine-tune took over 600 s, 5.5 min of it Ray Train
    starting its worker group."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tunedex"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tunedex {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def sets(*overrides: str) -> list[str]:
    """`--set K=V` for each override: the one override syntax of every tunedex command."""
    return [a for kv in overrides for a in ("--set", kv)]


def lora_models(root: Path, seeds: tuple[int, ...]) -> tuple[Path, list[Path]]:
    """A tiny Llama base and one LoRA adapter per seed (random, non-zero B: each one changes the answers),
    exported as `tunedex finetune` exports with finetune.lora.merge: false (adapter, tokenizer, a card naming
    the base)."""
    import json

    import torch

    from tunedex.infra.config import FinetuneConfig
    from tunedex.workers import base_model as bm

    ft = FinetuneConfig(tiny={"architecture": "llama", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 400},
                        adapter="lora", lora={"merge": False, "r": 8}, max_length=512)
    tok = bm.train_tokenizer([f"Product {i} costs {i * 3} dollars; returns within {i} days." for i in range(300)], 400)
    base = Path(bm.export_base(ft, tok, root / "base"))
    adapters = []
    for seed in seeds:
        spec = bm.model_spec(ft, tok)
        model = bm.build_model(spec)
        rng = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.copy_(torch.randn(weight.shape, generator=rng) * 0.5)
        out = root / f"adapter-{seed}"
        bm.save_model(model, spec, out)
        tok.save_pretrained(out)
        (out / "model_card.json").write_text(json.dumps({"base_model_path": str(base), "adapter": "lora"}))
        adapters.append(out)
    return base, adapters


def embedding_model_copy(dst: Path, permute: bool = False) -> Path:
    """The packaged embedding model under another path: another embedding model id as far as tunedex knows.
    With `permute`, a genuinely different model: every hidden dimension of the transformer permuted (seed 0), so
    it ranks texts exactly as the original does but its vectors are the original's permuted, nearly orthogonal to
    them: a query embedded with the wrong model finds other chunks."""
    from safetensors.numpy import load_file, save_file

    from tunedex.infra.embedding import resolve_model_path

    src = Path(resolve_model_path("all-MiniLM-L6-v2"))
    for f in src.rglob("*"):
        if f.is_file() and f.relative_to(src).parts[0] != "onnx" and not (permute and f.name == "model.safetensors"):
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).symlink_to(f)
    if permute:
        weights = load_file(str(src / "model.safetensors"))
        p = np.random.default_rng(0).permutation(weights["embeddings.LayerNorm.weight"].shape[0])
        for name, w in weights.items():
            if name.endswith(("embeddings.weight", ".query.weight", ".key.weight", ".value.weight",
                              "intermediate.dense.weight")):
                weights[name] = w[:, p]  # reads the hidden state
            elif name.endswith(("attention.output.dense.weight", "output.dense.weight")) and "intermediate" not in name:
                weights[name] = w[p]  # writes it
            elif name == "pooler.dense.weight":
                weights[name] = w[p][:, p]
            elif "LayerNorm" in name or name.endswith(("output.dense.bias", "pooler.dense.bias")):
                weights[name] = w[p]
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
    return dst


def ray_rss_mb(cfg: TunedexConfig, title: str) -> float:
    """Resident memory (MB) of this stack's Ray worker processes whose title holds `title` (e.g. "ProxyActor"):
    the children of the raylet serving the stack's GCS address, not another cluster's on the machine."""
    import psutil

    gcs = re.compile(rf"--gcs-address=\S+:{cfg.ray.port}\b")  # the node's IP or loopback; the port is the stack's
    raylets = [p for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "raylet" and gcs.search(" ".join(p.info["cmdline"] or []))]
    assert raylets, f"no raylet of the Ray head on port {cfg.ray.port}"
    procs = [c for r in raylets for c in r.children(recursive=True) if title in " ".join(c.cmdline())]
    assert procs, f"no process of this stack titled {title!r}"
    return sum(c.memory_info().rss for c in procs) / 2**20


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, demo: dict[str, Path], request: pytest.FixtureRequest):
    """`tunedex up` on free ports; yields (config path, config); `tunedex down` at the end."""
    root = tmp_path_factory.mktemp("stack")
    path = write_config(root / "tunedex.yaml", root / "data", finetune={"train_file": str(demo["facts"])},
                        milvus={"local_engine": request.config.getoption("milvus_engine")})
    cfg: TunedexConfig = load_config(path)
    try:
        services.up(cfg)
        os.environ.update(services.ray_env(cfg))
        yield path, cfg
    finally:
        services.down(cfg)


@pytest.fixture(scope="session")
def pipeline(stack, demo):
    """The README's path on the stack: index day 1, fine-tune, promote, serve. Tests that change what the
    endpoint serves leave a release serving; tests/reliability runs after the rest (see below)."""
    path, cfg = stack
    cwd = path.parent
    out = {"cfg": cfg, "path": path, "cwd": cwd}
    out["check"] = run_cli("config", "check", str(path), cwd=cwd)
    out["index"] = run_cli("index", str(demo["day1"]), "-c", str(path), cwd=cwd)
    out["finetune"] = run_cli("finetune", str(path), "--set", "finetune.max_steps=30", cwd=cwd)
    out["promote"] = run_cli("promote", "-c", str(path), cwd=cwd)
    out["serve"] = run_cli("serve", "-c", str(path), cwd=cwd)
    return out


# ---- the reliability table: `make reliability` runs every test marked `scenario` and writes the table ----

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--scenario-table", metavar="PATH", default=None,
                     help="write a Markdown table of the shared/RELIABILITY.md scenarios run and what held")
    parser.addoption("--milvus-engine", default="milvus-lite-2.5", choices=["milvus-lite-2.5", "milvus-lite-3"],
                     help="milvus.local_engine of the shared stack (the tests run on either embedded engine)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fault scenarios run last, so that what they do to the shared stack cannot disturb the other tests."""
    items.sort(key=lambda item: "reliability" in item.path.parts)


_SCENARIOS: dict[str, dict] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _SCENARIOS.get(report.nodeid)
    if entry is None:
        return
    if report.when == "call" or report.outcome != "passed":
        entry["outcome"] = "skipped" if report.skipped else report.outcome if report.when == "call" else f"error in {report.when}"
        entry["seconds"] += report.duration
        entry["held"] = [str(v) for k, v in report.user_properties if k == "held"]
        if report.failed:
            entry["detail"] = str(report.longrepr).strip().splitlines()[-1][:200]


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        mark = item.get_closest_marker("scenario")
        if mark is not None:
            sid, applies = mark.args
            _SCENARIOS[item.nodeid] = {"id": sid, "applies": applies, "outcome": "not run", "seconds": 0.0,
                                       "held": [], "soak": item.get_closest_marker("soak") is not None}


def pytest_sessionfinish(session: pytest.Session) -> None:
    stop_ephemeral_prefect()
    path = session.config.getoption("--scenario-table")
    if not path or not _SCENARIOS:
        return
    Path(path).write_text(scenario_table(list(_SCENARIOS.items())))


def stop_ephemeral_prefect() -> None:
    """Stop Prefect's ephemeral API, if a test started one in this process, while pytest is still running: its
    atexit stop logged a traceback into a test's output that pytest had closed by then."""
    if "prefect.server.api.server" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api import server as prefect_server

        for worker in (APILogWorker, EventsWorker):  # the flow runs' logs and events, sent before their API goes
            worker.drain_all(timeout=5)
        prefect_server.subprocess_server_logger.disabled = True  # its console handler holds a test's closed output
        for server in list(prefect_server.SubprocessASGIServer._instances.values()):
            server.stop()


def scenario_table(entries: list[tuple[str, dict]]) -> str:
    order = sorted(entries, key=lambda e: (int(e[1]["id"].lstrip("S")), e[0]))
    lines = [
        "# Reliability scenarios: the last `make reliability` run",
        "",
        f"Written by `make reliability` on {time.strftime('%Y-%m-%d %H:%M %Z')} ({len(order)} tests). Each row is a test "
        "that applies a scenario of shared/RELIABILITY.md for real on one machine (localhost only) and asserts its "
        "\"must hold\" line; *soak* rows are the kill loops and load runs `make test` leaves out.",
        "",
        "| Scenario | What it applies | Test | Result | What held (figures from the run) |",
        "|---|---|---|---|---|",
    ]
    for nodeid, e in order:
        test = nodeid.split("::", 1)[-1] + (" *(soak)*" if e["soak"] else "")
        held = "; ".join(e["held"]) or e.get("detail", "")
        result = f"{e['outcome']} ({e['seconds']:.0f} s)"
        lines.append(f"| {e['id']} | {e['applies']} | `{test}` | {result} | {held} |".replace("\n", " "))
    missing = sorted({f"S{i}" for i in range(1, 17)} - {e["id"] for _, e in order}, key=lambda s: int(s[1:]))
    if missing:
        lines += ["", f"No test ran for: {', '.join(missing)}."]
    lines += ["", "## Must-hold lines not asserted as written", ""] + [f"- {gap}" for gap in KNOWN_GAPS]
    return "\n".join(lines) + "\n"


# Where a scenario's must-hold line is not asserted as shared/RELIABILITY.md states it, and why; the figures
# are in the rows above.
KNOWN_GAPS = [
    "S8, S9 timing lines (no request stalls > 3x the baseline p99; rejections in < 1 s; slots free within 5 s): "
    "tests assert no timing "
    "bound (they must pass on a slow, busy machine); the figures are recorded in the rows, and the latency "
    "targets live in bench/serve_bench.py.",
    "S10 'the next scheduled run can acquire the slot within 2 min' after its worker is SIGKILLed: asserted on "
    "when the dead run's slot is free again (Prefect's lease expiry, tunedex's 60 s grace); when a freshly started "
    "worker then starts the next run is the machine's speed and is recorded (~100 s with busy loops on both cores "
    "beside the suite).",
    "S14 server RSS < 20 MB across a 50 MB upload: asserted for tunedex's Ingress replica; Ray Serve's HTTP proxy "
    "reads a body ahead of the app into an unbounded queue (serve/_private/proxy.py) and grows by about the "
    "upload (the row's figure). Cap request bodies in front of Serve (an ingress `client_max_body_size`).",
    "S11 (a) 'stop the Milvus Lite server for 5 s': stopped for 5 s and then kept down until the write task has "
    "failed once; beside two busy loops one batch's embedding outlasted a plain 5 s stop, no write met the outage "
    "and the run completed with no retry (the fault never happened); the rows record how long it was down.",
]
