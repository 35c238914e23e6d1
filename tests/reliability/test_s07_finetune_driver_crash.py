"""S7: the training driver crashes and the run is submitted again; a kill mid-checkpoint; a double submit.

(a) The Ray job's entrypoint (`tunedex finetune`, the Train driver) is SIGKILLed mid-run; submitting the same
run name again (as the finetune flow does, under `<id>-a2`) resumes at the last complete checkpoint.
(b) A test hook holds rank 1's checkpoint upload back; the driver is killed while only rank 0's files are
in storage: that partial checkpoint is reported and ignored, never loaded.
(c) Two finetune flow runs for the same config and data start within 100 ms: one Ray job, one model; and
two threads submitting one submission id at once through the Jobs API: one job, neither fails (ray#31356).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import run_cli, sets
from reliability.prefect_stack import prefect_api  # noqa: F401 - a fixture (flows_setup's Prefect server)
from reliability.test_s06_finetune_worker_kill import (registered_checkpoints, summary, train_workers, tunedex,
                                                       wait_for_checkpoints)
from test_flows import flows_setup  # noqa: F401 - a fixture: a flow config on the shared stack
from tunedex.flows.finetune import TERMINAL, entrypoint, follow, job_client, submit_or_follow, submission_id
from tunedex.infra import registry
from tunedex.workers.checkpoints import MARKER, CheckpointError, verify_checkpoint

pytestmark = [pytest.mark.slow]
S7 = "S7"  # each test names what of S7 it applies

STEPS, SAVE = 30, 5


class Lines:
    """A `log` for `follow`: keeps the job's lines."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, line: str) -> None:
        self.lines.append(line)


def wait_until_workers_gone(cfg, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while train_workers(cfg) and time.monotonic() < deadline:
        time.sleep(1)
    assert not train_workers(cfg), "the killed run's workers are still alive"


def wait_for_job(client, job_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id).value) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
    return status


@pytest.mark.soak
@pytest.mark.scenario(S7, "(a) SIGKILL the Ray job's entrypoint (the Train driver) after checkpoint #2, resubmit the same run name")
def test_a_killed_driver_resumes_when_the_same_run_is_submitted_again(stack, record_property):
    path, cfg = stack
    client = job_client(cfg)
    name = f"s7-driver-{time.time_ns() % 10**8}"
    run = cfg.data_dir.resolve() / "ray_results" / name
    command = entrypoint(cfg, str(path), [f"finetune.max_steps={STEPS}", f"finetune.save_steps={SAVE}",
                                          "finetune.logging_steps=5"], name)
    first, submitted = submit_or_follow(client, name, command)
    assert (first, submitted) == (name, True)
    deadline = time.monotonic() + 300
    while len([c for c in registered_checkpoints(run) if c["step"]]) < 2 and time.monotonic() < deadline:
        assert client.get_job_status(first).value not in TERMINAL, client.get_job_logs(first)[-3000:]
        time.sleep(0.1)
    drivers = [p for p in psutil.process_iter(["cmdline"])
               if "tunedex.cli" in " ".join(p.info["cmdline"] or []) and f"finetune.ray.run_name={name}" in p.info["cmdline"]]
    assert len(drivers) == 1, drivers
    os.kill(drivers[0].pid, signal.SIGKILL)
    time.sleep(2)
    last_step = max(c["step"] for c in registered_checkpoints(run) if c["step"])
    assert wait_for_job(client, first) == "FAILED"
    wait_until_workers_gone(cfg)
    again, submitted = submit_or_follow(client, name, command)  # what the flow does after a FAILED job
    assert (again, submitted) == (f"{name}-a2", True)
    log = Lines()
    status = follow(client, again, log, poll_s=1)
    assert status == "SUCCEEDED", "\n".join(log.lines[-40:])
    card = registry.load_model(cfg.registry_dir, name)["card"]
    assert card["metrics"]["resumed_from_step"] == last_step and card["metrics"]["steps"] == STEPS
    assert len(card["metrics"]["losses"]) == STEPS
    # a new name with the same storage starts from step 0
    fresh = summary(run_cli("finetune", str(path), *sets("finetune.max_steps=5", f"finetune.ray.run_name={name}-new"),
                            cwd=path.parent).stdout)
    assert fresh.group(3) is None and fresh.group(2) == "5"
    record_property("held", f"driver pid {drivers[0].pid} killed after the checkpoint at step {last_step}: job "
                            f"FAILED; resubmitted as {again}: resumed at step {last_step}, {STEPS}/{STEPS} steps, "
                            "1 model version; a new name started at step 0")


@pytest.mark.scenario(S7, "(b) kill the driver while rank 1's checkpoint upload is held back (rank 0's files written)")
def test_a_checkpoint_cut_short_by_a_kill_is_never_loaded(stack, record_property):
    path, cfg = stack
    name = "s7-partial"
    run = cfg.data_dir.resolve() / "ray_results" / name
    proc = tunedex(stack, f"finetune.max_steps={STEPS}", f"finetune.save_steps={SAVE}", "finetune.logging_steps=5",
                   f"finetune.ray.run_name={name}", "finetune.ray.checkpoint_upload_delay_s=15")
    complete = wait_for_checkpoints(proc, run, 1, timeout=300)
    deadline, partial = time.monotonic() + 120, None
    while partial is None and time.monotonic() < deadline and proc.poll() is None:
        known = {c["dir"].name for c in registered_checkpoints(run)}
        for d in run.glob("checkpoint_2*"):
            if d.name not in known and (d / MARKER.format(rank=0)).is_file() and not (d / MARKER.format(rank=1)).exists():
                partial = d
        time.sleep(0.1)
    assert partial is not None, "rank 0's half of checkpoint #2 never appeared"
    proc.send_signal(signal.SIGKILL)  # the driver, while rank 1 holds its upload back
    proc.communicate(timeout=60)
    wait_until_workers_gone(cfg)
    last_step = max(c["step"] for c in registered_checkpoints(run) if c["step"])
    assert last_step == complete[-1]["step"] == SAVE
    assert partial.name not in {c["dir"].name for c in registered_checkpoints(run)}
    with pytest.raises(CheckpointError, match="lacks rank 1's completion marker"):
        verify_checkpoint(partial, world=2)
    again = run_cli("finetune", str(path), *sets(f"finetune.max_steps={STEPS}", f"finetune.save_steps={SAVE}",
                    "finetune.logging_steps=5", f"finetune.ray.run_name={name}"), cwd=path.parent)
    assert f"ignoring partial checkpoint {partial}: rank 1's completion marker is missing" in again.stderr
    m = summary(again.stdout)
    assert m.group(2) == str(STEPS) and m.group(3) == str(last_step)  # the complete one, not the partial (step 10)
    assert partial.name not in {c["dir"].name for c in registered_checkpoints(run)}
    record_property("held", f"driver killed with checkpoint #2 half-written ({len(list(partial.rglob('*')))} of rank 0's "
                            f"files, no rank 1 marker): never registered, reported and ignored on resubmit; resumed at "
                            f"step {last_step}, {STEPS}/{STEPS} steps")


@pytest.mark.scenario(S7, "(c) two finetune flow runs of one config and data started within 100 ms (two threads)")
def test_two_flow_runs_started_together_share_one_ray_job_and_one_model(flows_setup, record_property):  # noqa: F811
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tunedex.flows.finetune import finetune
    from tunedex.flows.common import flow_config

    config, cfg = str(flows_setup["path"]), flows_setup["cfg"]
    overrides = ["finetune.max_steps=8", "finetune.save_steps=4"]  # not the id test_flows' runs use
    run_name = submission_id(flow_config(config, overrides))
    barrier, started, states = threading.Barrier(2), {}, {}

    def trigger(i: int) -> None:
        with temporary_settings({PREFECT_API_URL: flows_setup["api"]}):
            barrier.wait()
            started[i] = time.monotonic()
            states[i] = finetune(config, overrides, return_state=True)

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert abs(started[0] - started[1]) < 0.1
    assert all(s.is_completed() for s in states.values()), {i: (s.type, s.message) for i, s in states.items()}
    results = [s.result() for s in states.values()]
    assert sorted(r["submitted"] for r in results) == [False, True]
    assert {r["job_id"] for r in results} == {run_name} and {r["model_path"] for r in results} == {results[0]["model_path"]}
    jobs = [j for j in job_client(cfg).list_jobs() if (j.submission_id or "").startswith(run_name)]
    assert [(j.submission_id, j.status.value) for j in jobs] == [(run_name, "SUCCEEDED")]
    versions = [p for p in (cfg.registry_dir / "models").glob("*.json") if p.stem.startswith(run_name)]
    assert [p.stem for p in versions] == [run_name]
    assert Path(registry.load_model(cfg.registry_dir, run_name)["path"]) == Path(results[0]["model_path"])
    record_property("held", f"flow runs started {abs(started[0] - started[1]) * 1000:.0f} ms apart: both COMPLETED, "
                            f"1 Ray job ({run_name}, SUCCEEDED; one submitted, one followed), 1 model version")


@pytest.mark.scenario(S7, "(c) two threads submit one Ray job submission id at the same instant (ray#31356)")
def test_two_quick_submissions_of_one_id_yield_one_job(stack, record_property):
    client = job_client(stack[1])
    base = f"tunedex-race-{time.time_ns()}"
    barrier, results = threading.Barrier(2), []

    def submit() -> None:
        barrier.wait()
        results.append(submit_or_follow(client, base, "echo ran"))

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {job for job, _ in results} == {base} and sorted(s for _, s in results) == [False, True]
    assert wait_for_job(client, base, timeout=60) == "SUCCEEDED"
    assert [j.submission_id for j in client.list_jobs() if (j.submission_id or "").startswith(base)] == [base]
    record_property("held", "2 simultaneous submissions of one id: 1 job (one submitted, one followed), SUCCEEDED")


def test_follow_streams_a_jobs_lines_as_they_come_and_returns_its_status(stack):
    """`follow` tails the job's log (no re-download of the whole log per poll): every line once, in order, a
    line written in two pieces kept whole, and the final status, for a job that fails and one already over."""
    client = job_client(stack[1])
    base = f"tunedex-follow-{time.time_ns()}"
    script = "import sys, time\nfor i in range(3):\n    print(f'line {i}', flush=True); time.sleep(1)\n" \
             "sys.stdout.write('half '); sys.stdout.flush(); time.sleep(1); print('whole', flush=True)\nsys.exit(3)"
    job, _ = submit_or_follow(client, base, f"{sys.executable} -c {shlex.quote(script)}")
    log = Lines()
    assert follow(client, job, log, poll_s=0.2) == "FAILED"
    assert [ln for ln in log.lines if ln.startswith(("line", "half"))] == ["line 0", "line 1", "line 2", "half whole"]
    again = Lines()
    assert follow(client, job, again, poll_s=0.2) == "FAILED"  # over already: its whole log, once
    assert [ln for ln in again.lines if ln.startswith(("line", "half"))] == ["line 0", "line 1", "line 2", "half whole"]
