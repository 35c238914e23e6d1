"""S8: release swap under load: promote, rollback, broken releases refused, a cold re-promote; nothing dropped."""

import contextlib
import itertools
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-key-123"}


@dataclass
class Load:
    """What the clients saw: (kind, status, release_id) per answer, failures, (start, seconds) per query."""
    results: list[tuple[str, int, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)
    readyz: list[int] = field(default_factory=list)
    swaps_started: float = 0.0
    stacks: str = ""
    dumping: threading.Lock = field(default_factory=threading.Lock)

    def dump_stacks_once(self) -> None:
        """At the first failed request, every Ray worker's Python stack (`ray stack`, py-spy): S8 has failed as a
        fresh replica that answered nothing, and the processes are gone by the time anyone looks."""
        if self.dumping.acquire(blocking=False):
            self.stacks = f"\nRay workers' stacks at the first failure (py-spy):\n{ray_worker_stacks()[-40000:]}"

    def assert_nothing_dropped(self, releases: set[str]) -> None:
        assert not self.failures, f"{self.failures[:5]}{self.stacks}"
        refused = [r for r in self.results if r[1] != 200]
        assert not refused, f"{refused[:5]}{self.stacks}"
        assert {release for _, _, release in self.results} == releases
        assert len(self.results) > 20
        assert self.readyz and set(self.readyz) == {200}, sorted(set(self.readyz))

    def summary(self) -> str:
        streams = sum(kind == "stream" for kind, _, _ in self.results)
        baseline = [s for t, s in self.latencies if t < self.swaps_started]
        during = [s for t, s in self.latencies if t >= self.swaps_started]
        p99 = float(np.percentile(baseline, 99))
        stalls = sum(s > 3 * p99 for s in during)
        return (f"{len(self.results)} requests ({streams} openai streams): 0 failed, /readyz 200 x{len(self.readyz)}; "
                f"query p99 {p99 * 1000:.0f} ms before the swaps, slowest during {max(during) * 1000:.0f} ms "
                f"({stalls} of {len(during)} over 3x the p99)")


def ray_worker_stacks() -> str:
    """`py-spy dump` of every Ray worker and actor on this machine (what `ray stack` does, without its sudo)."""
    import psutil

    dumps = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::") and not cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
            dump = subprocess.run([str(Path(sys.executable).with_name("py-spy")), "dump", "--pid", str(proc.pid)],
                                  capture_output=True, text=True, timeout=60)
            dumps.append(f"--- pid {proc.pid}: {cmd.strip()[:100]}\n{dump.stdout}{dump.stderr}")
    return "\n".join(dumps)


@contextlib.contextmanager
def under_load(url: str, queries: int = 3, streams: int = 1, stream_tokens: int = 24):
    """`queries` /v1/query clients, `streams` streaming clients (the openai client and raw server-sent events by
    turns) and a /readyz poller, in threads, until the block ends; the swaps start after 4 s of baseline."""
    import openai

    load, stop = Load(), threading.Event()

    def query_loop() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                try:
                    started = time.monotonic()
                    resp = http.post(f"{url}/v1/query", json={"question": "When is shipping free?"}, headers=AUTH)
                    load.latencies.append((started, time.monotonic() - started))
                    load.results.append(("query", resp.status_code, resp.json().get("release_id", "")))
                    if resp.status_code != 200:
                        load.dump_stacks_once()
                except Exception as exc:  # noqa: BLE001 - every failure is what this test counts
                    load.failures.append(repr(exc))
                    load.dump_stacks_once()

    def readyz_loop() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    load.readyz.append(http.get(f"{url}/readyz").status_code)
                except Exception as exc:  # noqa: BLE001
                    load.failures.append(f"/readyz: {exc!r}")
                time.sleep(0.2)

    def openai_stream(client: openai.OpenAI) -> tuple[bool, str]:
        chunks = list(client.chat.completions.create(
            model="tunedex", stream=True, max_tokens=stream_tokens,
            messages=[{"role": "user", "content": "Tell me about the Quartz lamp"}]))
        ok = chunks[-1].choices[0].finish_reason == "stop" and len({c.model for c in chunks}) == 1
        return ok, chunks[0].model_extra["release_id"]

    def raw_stream(http: httpx.Client) -> tuple[bool, str]:
        """The same stream read as server-sent events: it must end with `data: [DONE]` (the openai client
        consumes that line unseen), every chunk from one release."""
        body = {"model": "tunedex", "stream": True, "max_tokens": stream_tokens,
                "messages": [{"role": "user", "content": "Tell me about the Quartz lamp"}]}
        with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH) as resp:
            events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        ok = resp.status_code == 200 and events[-1] == "[DONE]" and len({c["model"] for c in chunks}) == 1
        return ok, chunks[0].get("release_id", "")

    def stream_loop() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key-123", max_retries=0, timeout=120)
        with httpx.Client(timeout=120) as http:
            for turn in itertools.count():
                if stop.is_set():
                    break
                try:
                    ok, release = openai_stream(client) if turn % 2 == 0 else raw_stream(http)
                    load.results.append(("stream", 200 if ok else 0, release))
                except Exception as exc:  # noqa: BLE001
                    load.failures.append(repr(exc))

    threads = [threading.Thread(target=query_loop) for _ in range(queries)]
    threads += [threading.Thread(target=stream_loop) for _ in range(streams)] + [threading.Thread(target=readyz_loop)]
    for t in threads:
        t.start()
    try:
        time.sleep(4)
        load.swaps_started = time.monotonic()
        yield load
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)


def serving(url: str) -> str:
    return httpx.get(f"{url}/readyz", timeout=10).json()["release_id"]


def model_copy(cfg, release_id: str, dst: Path) -> Path:
    src = Path(json.loads((cfg.registry_dir / "releases" / f"{release_id}.json").read_text())["model_path"])
    shutil.copytree(src, dst)
    return dst


def promote_model(model: Path, path: str, cwd: Path, *overrides: str) -> str:
    out = run_cli("promote", "--model", str(model), "-c", path, *overrides, cwd=cwd).stdout
    assert "the endpoint now serves it" in out, out
    return re.search(r"promoted (rel-\S+):", out).group(1)


def refuse_corrupt(model: Path, path: str, cwd: Path) -> None:
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    proc = run_cli("promote", "--model", str(model), "-c", path, cwd=cwd, check=False)
    assert proc.returncode == 1 and "unreadable" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(1800)  # one engine load beside 4 busy clients: minutes on 2 cores
@pytest.mark.scenario("S8", "promote A->B, rollback, a corrupt release refused, promote B again, under 3 query "
                            "clients + 1 openai streaming client (one engine load: CI's share of S8)")
def test_promote_rollback_and_a_corrupt_release_under_load_drop_nothing(pipeline, tmp_path, record_property):
    cfg, path, cwd = pipeline["cfg"], str(pipeline["path"]), pipeline["cwd"]
    url = cfg.serve.url
    a = serving(url)
    model_b = model_copy(cfg, a, tmp_path / "model-b")
    with under_load(url) as load:
        b = promote_model(model_b, path, cwd)
        assert b != a and serving(url) == b
        time.sleep(2)
        rolled = run_cli("rollback", "-c", path, cwd=cwd).stdout
        assert f"rolled back to {a} (the endpoint now serves it; it was still loaded)" in rolled, rolled
        assert serving(url) == a
        refuse_corrupt(model_copy(cfg, a, tmp_path / "model-c"), path, cwd)
        assert serving(url) == a
        again = run_cli("promote", b, "-c", path, cwd=cwd).stdout
        assert "it was still loaded" in again, again  # B stayed loaded after the rollback: no model load
        assert serving(url) == b
    load.assert_nothing_dropped({a, b})
    record_property("held", f"promote, rollback, a corrupt release (refused, A kept serving), promote again: "
                            f"{load.summary()}; every answer from A or B, each stream from one release")


# five vLLM engine loads (A's and B's models, B's base, a failing release, B cold again) on 2 shared cores
@pytest.mark.soak
@pytest.mark.timeout(2400)
@pytest.mark.scenario("S8", "promote A->B, rollback, a corrupt and a failing release, cold re-promote of B, under 8 "
                            "clients: 4 query and 4 streaming (openai and raw SSE), streams of up to 48 tokens")
def test_release_swap_under_load_drops_nothing(pipeline, tmp_path, record_property):
    """promote A -> B, rollback -> A, two broken releases refused, promote B again (cold load), all while
    clients query and stream; every answer names the release that produced it."""
    cfg, path, cwd = pipeline["cfg"], str(pipeline["path"]), pipeline["cwd"]
    url = cfg.serve.url
    a = serving(url)
    model_b = model_copy(cfg, a, tmp_path / "model-b")
    with under_load(url, queries=4, streams=4, stream_tokens=48) as load:  # RELIABILITY.md: 8 clients, 4 streams
        b = promote_model(model_b, path, cwd, "--set", "serve.serve_base_model=true")
        assert b != a and serving(url) == b
        rag = httpx.post(f"{url}/v1/query", json={"question": "When is shipping free?", "mode": "rag"},
                         headers=AUTH, timeout=60)
        assert rag.status_code == 200 and rag.json()["release_id"] == b  # B loaded its base model too
        time.sleep(2)
        rolled = run_cli("rollback", "-c", path, cwd=cwd).stdout
        assert f"rolled back to {a} (the endpoint now serves it; it was still loaded)" in rolled, rolled
        assert serving(url) == a
        broken = model_copy(cfg, a, tmp_path / "model-c")
        refuse_corrupt(broken, path, cwd)
        (broken / "model.safetensors").write_bytes((model_b / "model.safetensors").read_bytes())
        (broken / "config.json").write_text('{"model_type": "gpt2", "n_embd": "many"}')
        proc = run_cli("promote", "--model", str(broken), "-c", path, cwd=cwd, check=False)
        assert proc.returncode == 1 and "failed to start" in proc.stderr and "serving release keeps serving" in proc.stderr
        assert serving(url) == a
        again = run_cli("promote", b, "-c", path, cwd=cwd).stdout  # B was retired to make room for the broken one
        assert "(the endpoint now serves it)" in again, again  # a cold load, not "still loaded"
    load.assert_nothing_dropped({a, b})
    assert serving(url) == b
    record_property("held", f"promote, rollback, a corrupt and a failing release (both refused, A kept serving), a "
                            f"cold re-promote: {load.summary()}; every answer from A or B, each stream from one release")
