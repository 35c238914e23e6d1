"""A local Prefect server, `tunedex worker` processes and what the flow tests read back from Prefect
(tests/test_flows.py, S10, S11). Real processes only: `prefect server start`, `tunedex worker`."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import psutil
import pytest

from tunedex.infra import store
from tunedex.infra.services import free_port

from reliability.indexing_helpers import collection, expected_rows, milvus_server, write_config, write_corpus

BIN = Path(sys.executable).parent
# How long a test waits for a flow run to get somewhere before calling it stuck: a hang guard sized for a busy
# machine (with busy loops on both cores a worker took ~100 s to pick a run up, a 200-doc re-embed over 180 s),
# not a bound. The scenarios' bounds (S10's slot, S11's crash detection) are asserted on their own figures.
PATIENCE = 600


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """`prefect server start` on a free port, its data in a temp dir; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false",
           # new schedules get their runs within 10 s, not 60: the stand-in for ticking a schedule by hand
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "10"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        raise AssertionError((home / "server.log").read_text()[-3000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextmanager
def prefect_client(api: str):
    """A sync Prefect client on `api` (the settings apply to this thread only)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


# ---- the nightly re-embed flow on its own Milvus Lite server, served by `tunedex worker` ----

@pytest.fixture(scope="module")
def reembed(request, prefect_api, tmp_path_factory):
    """A corpus of the module's `CORPUS_DOCS` documents (200: ~490 chunks, 35-150 s to embed on 2 busy cores),
    its own Milvus Lite server (a test may stop it) and a config pointing the flows at the module's Prefect server.
    Its crash window is Prefect's documented 3 heartbeats, not tunedex's 50 s: on a busy machine a live run's
    heartbeat came 19 s late and the run was marked Crashed (S11's outage run, 2026-12-07), and these runs are
    not about crash detection; S11's zombie test runs its worker on the default."""
    root = tmp_path_factory.mktemp("reembed")
    corpus = root / "corpus"
    write_corpus(corpus, random.Random(10), getattr(request.module, "CORPUS_DOCS", 200))
    path = write_config(root, "nightly", corpus={"path": str(corpus)},
                        prefect={"api_url": prefect_api, "crash_after_s": 93})
    with milvus_server(path) as cfg:
        yield {"path": path, "cfg": cfg, "corpus": corpus, "api": prefect_api, "cwd": root,
               "collection": collection(cfg), "params": {"config": str(path.resolve()), "overrides": []}}


def stored_set(cfg, name: str) -> tuple[set[tuple[str, str, str]], int]:
    """(chunk_id, doc_id, doc_version) of every row (Strong), and count(*)."""
    client = store.connect(cfg.milvus)
    try:
        if not client.has_collection(name):
            return set(), 0
        rows = {(r["chunk_id"], r["doc_id"], r["doc_version"]) for r in store.iter_rows(client, name, store.LEDGER_FIELDS)}
        return rows, store.count_rows(client, name)
    finally:
        client.close()


def drop_collection(cfg, name: str) -> None:
    client = store.connect(cfg.milvus)
    client.drop_collection(name)
    client.close()


def corpus_rows(setup: dict) -> set[tuple[str, str, str]]:
    return expected_rows(setup["corpus"], setup["cfg"])


@contextmanager
def tunedex_worker(setup: dict, log_name: str = "worker.log", *sets: str) -> Iterator[subprocess.Popen]:
    """`tunedex worker -c CONFIG [--set K=V ...]` in its own session; stopped with SIGTERM at the end if still
    alive. It polls for runs every 2 s (Prefect's default is 10 s, as long as a first re-embed run here: a run triggered
    to overlap it could otherwise be picked up only after it ended)."""
    log = open(setup["cwd"] / log_name, "ab")
    sets_args = [arg for kv in sets for arg in ("--set", kv)]
    proc = subprocess.Popen([str(BIN / "tunedex"), "worker", "-c", str(setup["path"]), *sets_args], cwd=setup["cwd"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
        log.close()


def flow_run_processes(worker_pid: int) -> dict[int, str]:
    """{pid: flow run id} of the worker's descendants that run a flow (Prefect sets PREFECT__FLOW_RUN_ID)."""
    out = {}
    try:
        children = psutil.Process(worker_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            run_id = child.environ().get("PREFECT__FLOW_RUN_ID")
        except psutil.Error:
            continue
        if run_id:
            out[child.pid] = run_id
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and every descendant at once (a lost machine): nobody is left to report."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


class ConcurrentRuns(threading.Thread):
    """Samples, every 0.2 s, how many distinct flow runs have a live process under the worker: each such
    process runs the indexer. `max_seen` is the most at one sample."""

    def __init__(self, worker_pid: int):
        super().__init__(daemon=True)
        self.worker_pid, self.max_seen, self.samples, self.runs = worker_pid, 0, 0, set()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            live = set(flow_run_processes(self.worker_pid).values())
            self.runs |= live
            self.max_seen, self.samples = max(self.max_seen, len(live)), self.samples + 1
            self._done.wait(0.2)

    def stop(self) -> "ConcurrentRuns":
        self._done.set()
        self.join(timeout=10)
        return self


def trigger(api: str, **kwargs: Any):
    """`run_deployment("nightly-reembed/nightly-reembed", ...)` without waiting; returns the flow run."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        return run_deployment("nightly-reembed/nightly-reembed", timeout=0, as_subflow=False, **kwargs)


def wait_state(api: str, run_id, done: Callable[[Any], bool], timeout: float = PATIENCE, every: float = 0.5):
    """Poll the flow run until `done(state)`; returns (state, seconds waited) or fails with the last state."""
    started = time.monotonic()
    with prefect_client(api) as client:
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and done(state):
                return state, time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"flow run {run_id} still {state.type.value if state else None} "
                                     f"({state.message if state else ''}) after {timeout:.0f} s")
            time.sleep(every)


def wait_deployment(api: str, applied_since: datetime | None = None, timeout: float = 120) -> Any:
    """The nightly-reembed deployment, once a worker has registered it (after `applied_since`, if given: a
    worker's start replaces the deployment's schedules)."""
    deadline = time.monotonic() + timeout
    with prefect_client(api) as client:
        while True:
            try:
                deployment = client.read_deployment_by_name("nightly-reembed/nightly-reembed")
                if applied_since is None or deployment.updated >= applied_since:
                    return deployment
            except Exception:  # ObjectNotFound until the worker applied it
                pass
            if time.monotonic() > deadline:
                raise AssertionError("no worker registered nightly-reembed/nightly-reembed")
            time.sleep(1)


def index_figures(api: str, run_id) -> dict[str, int] | None:
    """The figures of the run's `tunedex-index-stats` artifact, or None when the run wrote none."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect_client(api) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    for artifact in found:
        if artifact.key == "tunedex-index-stats":
            return {k: int(float(v)) for k, v in re.findall(r"^\| (\w+) \| ([\d.]+) \|$", artifact.data, re.M)}
    return None


def task_runs(api: str, run_id) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect_client(api) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def wait_rows(cfg, name: str, at_least: int, every: float = 0.3) -> int:
    """Poll the collection until it holds `at_least` rows (the flow is writing); returns the count seen."""
    deadline = time.monotonic() + PATIENCE
    while (written := rows_in(cfg, name)) < at_least:
        assert time.monotonic() < deadline, f"the flow wrote fewer than {at_least} rows within {PATIENCE} s"
        time.sleep(every)
    return written


def rows_in(cfg, name: str) -> int:
    client = store.connect(cfg.milvus)
    try:
        return store.count_rows(client, name) if client.has_collection(name) else 0
    finally:
        client.close()
