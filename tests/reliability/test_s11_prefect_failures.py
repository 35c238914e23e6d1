"""S11: the nightly re-embed flow, served by a real `tunedex worker`, under a transient failure (the Milvus
Lite server stopped mid-write), a permanent one (an invalid config) and a crash (its process SIGKILLed):
retried, failed once, and marked Crashed, in that order; no finished work is redone afterwards."""

from __future__ import annotations

import signal
import time

import pytest
import yaml

from reliability.prefect_stack import (  # noqa: F401 - prefect_api and reembed are fixtures
    corpus_rows, drop_collection, flow_run_processes, index_figures, kill_tree, prefect_api, prefect_client,
    reembed, rows_in, stored_set, task_runs, trigger, tunedex_worker, wait_deployment, wait_rows, wait_state,
)
from tunedex.flows.deploy import CRASH_DETECTION, HEARTBEAT_SECONDS
from tunedex.infra import services
from tunedex.infra.config import TunedexConfig

pytestmark = [pytest.mark.slow, pytest.mark.scenario(
    "S11", "Milvus Lite server stopped mid-write (5 s, and until the write task has failed once); a config with a "
           "misspelt key; the flow-run process SIGKILLed with and without its worker (heartbeat 31 s)")]


def final(state) -> bool:
    return state.is_final()


def running_or_final(state) -> bool:
    return state.is_running() or state.is_final()


def index_task_runs(api: str, run_id) -> list:
    return [t for t in task_runs(api, run_id) if t.name.startswith("index_task")]


def index_task_run(api: str, run_id):
    (task,) = index_task_runs(api, run_id)
    return task


def wait_task_failed(api: str, run_id, timeout: float = 180) -> float:
    """Seconds until the run's index task has failed an attempt (a state AwaitingRetry or Failed)."""
    started = time.monotonic()
    with prefect_client(api) as client:
        while True:
            tasks = index_task_runs(api, run_id)
            states = client.read_task_run_states(tasks[0].id) if tasks else []
            waited = time.monotonic() - started
            if any(s.name in ("AwaitingRetry", "Failed") for s in states):
                return waited
            assert waited < timeout, f"the index task met no failure {timeout:.0f} s into the outage"
            time.sleep(0.5)


def test_milvus_stopped_mid_write_is_retried_with_backoff_and_the_run_completes(reembed, record_property):
    api, cfg, name = reembed["api"], reembed["cfg"], reembed["collection"]
    with tunedex_worker(reembed, "worker-outage.log"):
        wait_deployment(api)
        run = trigger(api, parameters=reembed["params"]).id
        wait_state(api, run, running_or_final)
        written = wait_rows(cfg, name, 64)  # the middle of the write phase (~480 rows, 16 a batch)
        services.stop_milvus(cfg)
        time.sleep(5)
        # down until the task has met the outage: on a busy machine one batch's embedding can outlast 5 s, and
        # a Milvus back before the next write is no fault at all (the fault-free run passed, no retry, on a
        # machine beside two busy loops)
        down_s = 5 + wait_task_failed(api, run)
        services.start_milvus(cfg)
        state, _ = wait_state(api, run, final)
    assert state.is_completed(), state.message
    task = index_task_run(api, run)
    with prefect_client(api) as client:
        history = sorted(client.read_task_run_states(task.id), key=lambda s: s.timestamp)
        total_s = client.read_flow_run(run).total_run_time.total_seconds()
    waits = [round((s.state_details.scheduled_time - s.timestamp).total_seconds())
             for s in history if s.name == "AwaitingRetry"]
    retries = task.run_count - 1
    assert 1 <= retries <= 3 and len(waits) == retries, (task.run_count, [s.name for s in history])
    assert waits == [2, 10, 30][:retries], waits  # the task's backoff, not an immediate loop
    expected = corpus_rows(reembed)
    rows, count = stored_set(cfg, name)
    assert rows == expected and count == len(expected), f"missing {len(expected - rows)}, extra {len(rows - expected)}"
    assert index_figures(api, run) is not None
    record_property("held", f"Milvus stopped at {written}/{len(expected)} rows for {down_s:.0f} s: index_task "
                            f"retried {retries}x (waits {waits} s), run COMPLETED in {total_s:.0f} s; "
                            f"collection == corpus ({count} rows); artifact written")


def test_an_invalid_config_fails_after_one_attempt_naming_the_key(reembed, record_property):
    api = reembed["api"]
    raw = yaml.safe_load(reembed["path"].read_text())
    raw["chunking"]["chunk_sise"] = 64  # misspelt
    bad = reembed["cwd"] / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with tunedex_worker(reembed, "worker-bad-config.log"):
        wait_deployment(api)
        run = trigger(api, parameters={"config": str(bad), "overrides": []}).id
        state, waited = wait_state(api, run, final)
    assert state.is_failed(), state
    assert "chunking.chunk_sise" in state.message and "chunk_size" in state.message, state.message
    task = index_task_run(api, run)
    assert task.run_count == 1 and task.state.is_failed()
    with prefect_client(api) as client:
        assert client.read_flow_run(run).run_count == 1
    record_property("held", f"Failed after 1 attempt (0 retries) {waited:.0f} s after the trigger: "
                            f"'{state.message[:160]}'")


def test_a_killed_run_is_marked_crashed_and_a_retrigger_redoes_no_finished_work(reembed, record_property):
    from prefect.automations import Automation
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, cfg, name = reembed["api"], reembed["cfg"], reembed["collection"]
    drop_collection(cfg, name)  # so the run has writing to do when it is killed
    default_window = TunedexConfig().prefect.crash_after_s  # the module's config widens it; this test is about it
    with tunedex_worker(reembed, "worker-zombie.log", f"prefect.crash_after_s={default_window}") as worker:
        wait_deployment(api)
        run = trigger(api, parameters=reembed["params"]).id
        wait_state(api, run, running_or_final)
        wait_rows(cfg, name, 200)  # about 40% written: the re-trigger has the rest to do, well under 4 min
        assert list(flow_run_processes(worker.pid).values()) == [str(run)]
        kill_tree(worker.pid)  # the worker dies with it (a lost machine): only the missing heartbeats tell
        killed_at = time.monotonic()
    written = rows_in(cfg, name)
    state, _ = wait_state(api, run, final, every=1)
    crashed_s = time.monotonic() - killed_at
    with temporary_settings({PREFECT_API_URL: api}):
        automation = Automation.read(name=CRASH_DETECTION)
    assert state.is_crashed(), state
    assert crashed_s <= 2 * HEARTBEAT_SECONDS, f"marked Crashed {crashed_s:.0f} s after the kill"
    expected = corpus_rows(reembed)
    with tunedex_worker(reembed, "worker-retrigger.log"):
        again = trigger(api, parameters=reembed["params"]).id
        again_state, _ = wait_state(api, again, final)
        noop = trigger(api, parameters=reembed["params"]).id
        noop_state, _ = wait_state(api, noop, final)
    assert again_state.is_completed() and noop_state.is_completed()
    figures = {r: index_figures(api, r) for r in (run, again, noop)}
    assert figures[run] is None and figures[again] and figures[noop]  # an artifact for every run that ended
    assert figures[again]["chunks_embedded"] == len(expected) - written  # only what the killed run had not stored
    assert figures[noop]["chunks_embedded"] == 0
    rows, count = stored_set(cfg, name)
    assert rows == expected and count == len(expected)
    record_property("held", f"worker + flow-run process SIGKILLed at {written}/{len(expected)} rows: CRASHED by the "
                            f"automation (no heartbeat for {automation.trigger.within.total_seconds():.0f} s, heartbeat "
                            f"{HEARTBEAT_SECONDS} s) {crashed_s:.0f} s after the kill; re-trigger embedded "
                            f"{figures[again]['chunks_embedded']} (the rest), the next 0; artifacts for the 2 "
                            f"completed runs, none for the crashed one")


def test_a_killed_run_under_a_live_worker_is_crashed_by_the_worker(reembed, record_property):
    api, cfg, name = reembed["api"], reembed["cfg"], reembed["collection"]
    # The kill must land mid-run: over an indexed corpus the run is a no-op of seconds, and on a busy machine it
    # wrote its artifact before the kill (CI, 2026-12-06). With the collection gone it has ~490 rows to write.
    drop_collection(cfg, name)
    with tunedex_worker(reembed, "worker-child-killed.log") as worker:
        wait_deployment(api)
        run = trigger(api, parameters=reembed["params"]).id
        wait_state(api, run, running_or_final, every=0.2)
        wait_rows(cfg, name, 16, every=0.2)  # writing: the rest takes far longer than the kill
        (pid,) = [p for p, r in flow_run_processes(worker.pid).items() if r == str(run)]
        services.psutil.Process(pid).send_signal(signal.SIGKILL)
        state, crashed_s = wait_state(api, run, final)
        assert worker.poll() is None
    assert state.is_crashed(), state
    assert index_figures(api, run) is None
    record_property("held", f"flow-run process SIGKILLed, worker alive: the worker marked it CRASHED in "
                            f"{crashed_s:.1f} s ('{(state.message or '')[:100]}')")
