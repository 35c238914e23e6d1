"""S10: overlapping and duplicate Prefect triggers of the nightly re-embed deployment, served by a real
`tunedex worker` against a real `prefect server start`: one run does the work, none runs beside another, no
work is done twice, and a slot held by a run whose worker died is given back in bounded time."""

from __future__ import annotations

import random
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from conftest import run_cli
from reliability.prefect_stack import (  # noqa: F401 - prefect_api and reembed are fixtures
    PATIENCE, ConcurrentRuns, corpus_rows, flow_run_processes, index_figures, kill_tree, prefect_api, prefect_client,
    reembed, stored_set, trigger, tunedex_worker, wait_deployment, wait_state,
)
from reliability.indexing_helpers import mutate

pytestmark = [pytest.mark.slow, pytest.mark.scenario(
    "S10", "run_deployment twice with one idempotency key, once more without while it runs; a cron registered "
           "twice; the worker SIGKILLed while a run holds the slot")]

RUNNER_PREFETCH_S = 10  # prefect.runner.Runner's prefetch_seconds: `tunedex worker` takes a run this early
CORPUS_DOCS = 200  # a first run long enough (~20 s) for an overlapping trigger to meet it, short enough for 4 min

def final(state) -> bool:
    return state.is_final()


def test_keyed_duplicates_share_a_run_and_an_overlap_is_cancelled_never_concurrent(reembed, record_property):
    api, params = reembed["api"], reembed["params"]
    with tunedex_worker(reembed, "worker-keys.log") as worker:
        wait_deployment(api)
        watch = ConcurrentRuns(worker.pid)
        watch.start()
        key, calls, starts = f"nightly-{uuid.uuid4()}", [], []
        barrier = threading.Barrier(2)

        def keyed_call() -> None:
            barrier.wait()
            starts.append(time.monotonic())
            calls.append(trigger(api, parameters=params, idempotency_key=key).id)

        threads = [threading.Thread(target=keyed_call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert abs(starts[0] - starts[1]) < 0.1
        assert calls[0] == calls[1], "two calls with one idempotency key made two flow runs"
        first = calls[0]
        wait_state(api, first, lambda s: s.is_running())
        overlap = trigger(api, parameters=params).id  # same parameters, no key, while the first runs
        overlap_state, _ = wait_state(api, overlap, final)
        first_state, _ = wait_state(api, first, final)
        assert first_state.is_completed(), first_state.message
        if not overlap_state.is_cancelled():
            with prefect_client(api) as client:
                runs = {r: client.read_flow_run(r) for r in (first, overlap)}
            pytest.fail(f"the overlapping run ended {overlap_state.type.value}: it started {runs[overlap].start_time}, "
                        f"the first run ended {runs[first].end_time}")
        assert "concurrency limit" in (overlap_state.message or ""), overlap_state

        before = corpus_rows(reembed)
        mutate(reembed["corpus"], random.Random(11), 0.05, "s10")  # 10 docs changed, 10 deleted, 10 added
        after = corpus_rows(reembed)
        # the first run's process outlives its COMPLETED state by its shutdown; the next run waits for that,
        # so that a sample with both is a real overlap
        deadline = time.monotonic() + 60
        while str(first) in flow_run_processes(worker.pid).values() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = trigger(api, parameters=params, idempotency_key=f"nightly-{uuid.uuid4()}").id
        second_state, _ = wait_state(api, second, final)
        watch.stop()
        with prefect_client(api) as client:
            first_s = client.read_flow_run(first).total_run_time.total_seconds()
    assert second_state.is_completed(), second_state.message
    figures = {run: index_figures(api, run) for run in (first, second)}
    assert all(figures.values()), f"a completed run wrote no index-stats artifact: {figures}"
    assert index_figures(api, overlap) is None
    changed = len({c for c, *_ in after} - {c for c, *_ in before})
    embedded = [figures[first]["chunks_embedded"], figures[second]["chunks_embedded"]]
    assert embedded == [len(before), changed], "a chunk was embedded twice, or one was missed"
    rows, count = stored_set(reembed["cfg"], reembed["collection"])
    assert rows == after and count == len(after)
    assert watch.max_seen == 1 and watch.runs == {str(first), str(second)}, (watch.max_seen, watch.runs)
    record_property("held", f"2 keyed calls {abs(starts[0] - starts[1]) * 1000:.0f} ms apart -> 1 flow run; "
                            f"unkeyed overlap CANCELLED ('{overlap_state.message}'); max {watch.max_seen} flow-run "
                            f"process at a time over {watch.samples} samples; chunks embedded {embedded} = "
                            f"{len(before)} new + {changed} changed; collection == corpus ({count} rows); "
                            f"first run {first_s:.0f} s")


def test_a_cron_registered_twice_runs_once_per_tick(reembed, record_property):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.schedules import CronSchedule

    api = reembed["api"]
    started = datetime.now(timezone.utc)
    with tunedex_worker(reembed, "worker-cron.log") as worker:
        deployment = wait_deployment(api, applied_since=started)  # its start replaces the schedule list
        watch = ConcurrentRuns(worker.pid)
        watch.start()
        with prefect_client(api) as client:  # the same cron twice, two schedule ids, behind tunedex's back
            client.create_deployment_schedules(deployment.id, [(CronSchedule(cron="* * * * *"), True)] * 2)
            ids = {s.id for s in client.read_deployment(deployment.id).schedules}
            runs_of = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
            deadline = time.monotonic() + 150
            while True:  # the first tick of the per-minute cron: its runs end (one runs, the rest cancelled)
                runs = [r for r in client.read_flow_runs(flow_run_filter=runs_of) if r.auto_scheduled]
                ticks: dict = {}
                for r in runs:
                    ticks.setdefault(r.expected_start_time, []).append(r)
                first_tick = min(ticks) if ticks else None
                if first_tick and all(r.state.is_final() for r in ticks[first_tick]):
                    break
                assert time.monotonic() < deadline, {t: [r.state.type.value for r in rs] for t, rs in ticks.items()}
                time.sleep(2)
            per_tick = max(len(rs) for rs in ticks.values())
            outcome = sorted(r.state.type.value for r in ticks[first_tick])
            # tunedex schedule (the worker does the same at start) replaces the schedule list with the configured
            # one; Prefect deletes the old schedules' runs still Scheduled for later (`future_only`), while a run
            # already due, or taken by the worker ahead of its time (the runner's prefetch), stays and is run (or
            # cancelled by the limit) like any late run
            run_cli("schedule", "-c", str(reembed["path"]), cwd=reembed["cwd"])
            replaced_at = datetime.now(timezone.utc) + timedelta(seconds=RUNNER_PREFETCH_S)
            schedules = client.read_deployment(deployment.id).schedules
            deadline = time.monotonic() + 180
            while True:  # the runs due before the replacement end before the worker stops
                runs = list(client.read_flow_runs(flow_run_filter=runs_of))
                due = [r for r in runs if r.expected_start_time <= replaced_at]
                if all(r.state.is_final() for r in due):
                    break
                assert time.monotonic() < deadline, [(r.expected_start_time, r.state.type.value) for r in due]
                time.sleep(2)
            later = [r for r in runs if r.auto_scheduled and r.expected_start_time > replaced_at]
            late = [r for r in due if r.auto_scheduled and r.expected_start_time not in ticks]
        watch.stop()
    assert len(ids) == 3  # the configured nightly cron plus the duplicate pair
    assert outcome.count("COMPLETED") == 1 and set(outcome) <= {"COMPLETED", "CANCELLED"}, outcome
    assert watch.max_seen == 1
    assert [s.schedule.cron for s in schedules] == ["0 2 * * *"]
    assert not any(r.expected_start_time.minute != 0 or r.expected_start_time.hour != 2 for r in later), later
    record_property("held", f"Prefect made {per_tick} runs per tick for a cron registered twice (its idempotency key "
                            f"has the schedule id); tunedex's CANCEL_NEW limit ran 1 of them ({', '.join(outcome)}), "
                            f"max {watch.max_seen} at a time; `tunedex schedule` left 1 schedule and no future per-minute run "
                            f"({len(later)} nightly ahead; {len(late)} run(s) already due at the replacement ended "
                            f"{', '.join(sorted(r.state.type.value for r in late)) or '-'})")


def test_a_slot_held_by_a_killed_worker_is_free_again_within_2_minutes(reembed, record_property):
    api, params = reembed["api"], reembed["params"]
    with tunedex_worker(reembed, "worker-killed.log") as worker:
        deployment = wait_deployment(api)
        stuck = trigger(api, parameters=params).id
        wait_state(api, stuck, lambda s: s.is_pending() or s.is_running(), every=0.05)
        killed = kill_tree(worker.pid)  # the worker and the run's process, at once
        killed_at = time.monotonic()
    stuck_state, _ = wait_state(api, stuck, lambda s: True, timeout=5)
    with prefect_client(api) as client:
        deadline = killed_at + PATIENCE
        while client.read_deployment(deployment.id).global_concurrency_limit.active_slots:
            assert time.monotonic() < deadline, f"the dead run's slot was not given back within {PATIENCE} s"
            time.sleep(1)
    freed_s = time.monotonic() - killed_at
    # the bound is on the slot (free for the next run to take); how soon a freshly started worker then picks the
    # run up is the machine's speed (~100 s with busy loops on both cores), recorded below
    assert freed_s <= 120, f"the dead run's slot was given back {freed_s:.0f} s after the kill"
    with tunedex_worker(reembed, "worker-after-kill.log"):
        nxt = trigger(api, parameters=params).id
        wait_state(api, nxt, lambda s: s.is_running() or s.is_final())
        acquired_s = time.monotonic() - killed_at
        nxt_state, _ = wait_state(api, nxt, final)
    assert nxt_state.is_completed(), nxt_state.message
    stuck_after, _ = wait_state(api, stuck, lambda s: True, timeout=5)
    by = ("tunedex's crash-detection automation marked it CRASHED" if stuck_after.is_crashed() else
          "Prefect's lease expiry (grace_period_seconds=60, tunedex's setting; default 300)")
    record_property("held", f"worker + run process SIGKILLed ({len(killed)} pids) with the run "
                            f"{stuck_state.type.value}; {by} freed the slot after {freed_s:.0f} s, no extra sweeper; "
                            f"the next run was RUNNING {acquired_s:.0f} s after the kill and COMPLETED; the killed run "
                            f"stays {stuck_after.type.value}")
