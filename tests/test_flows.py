"""The Prefect flows against a local Prefect server and the test's Ray head: schedules, real Ray job
submission, the promotion gate, retries of transient failures only (overlapping and duplicate triggers: S10 in
tests/reliability/test_s10_prefect_triggers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import run_cli, write_config
from reliability.prefect_stack import last_json, prefect_api, prefect_client  # noqa: F401 - prefect_api is a fixture
from tunedex.infra import registry, services
from tunedex.infra.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flows_setup(stack, demo, prefect_api, tmp_path_factory):
    """A config on the shared stack with the Prefect server, the day-1 corpus and QA set, a quick fine-tune."""
    _, stack_cfg = stack
    root = tmp_path_factory.mktemp("flows")
    # the shared stack's services, data dir and endpoint; this config adds the Prefect server and flow settings
    path = write_config(root / "tunedex.yaml", stack_cfg.data_dir, prefect={"api_url": prefect_api},
                        milvus={"uri": stack_cfg.milvus.uri},
                        ray={"address": stack_cfg.ray.address, "dashboard_port": stack_cfg.ray.dashboard_port,
                             "client_server_port": stack_cfg.ray.client_server_port,
                             "metrics_export_port": stack_cfg.ray.metrics_export_port},
                        serve={"port": stack_cfg.serve.port}, corpus={"path": str(demo["day1"])},
                        finetune={"train_file": str(demo["facts"]), "max_steps": 10, "logging_steps": 5},
                        evaluate={"qa_file": str(demo["qa_day1"]), "max_questions": 16})
    cfg = load_config(path)
    return {"path": path, "cfg": cfg, "cwd": root, "api": prefect_api}


def test_schedule_registers_deployments_with_cron_timezone_and_one_run_at_a_time(flows_setup):
    out = run_cli("schedule", "-c", str(flows_setup["path"]), "--set", "prefect.timezone=Europe/Berlin",
                  cwd=flows_setup["cwd"]).stdout
    assert "deployment nightly-reembed/nightly-reembed: 0 2 * * * (Europe/Berlin)" in out
    with prefect_client(flows_setup["api"]) as client:
        deployment = client.read_deployment_by_name("nightly-reembed/nightly-reembed")
        schedule = deployment.schedules[0].schedule
        assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert deployment.parameters["config"] == str(flows_setup["path"].resolve())
        names = {d.name for d in client.read_deployments()}
    assert {"nightly-reembed", "finetune", "evaluate-and-promote", "refresh"} <= names


def test_finetune_flow_submits_one_ray_job_and_a_retrigger_trains_nothing(flows_setup):
    from tunedex.flows.finetune import job_client

    path, cwd, cfg = str(flows_setup["path"]), flows_setup["cwd"], flows_setup["cfg"]
    first = last_json(run_cli("flows", "run", "finetune", "-c", path, cwd=cwd))
    assert first["submitted"] and first["job_id"].startswith("tunedex-ft-") and first["steps"] == 10
    assert Path(first["model_path"], "model.safetensors").is_file()
    again = last_json(run_cli("flows", "run", "finetune", "-c", path, cwd=cwd))
    assert (again["submitted"], again["job_id"], again["model_path"]) == (False, None, first["model_path"])
    jobs = job_client(cfg).list_jobs()
    assert [j.submission_id for j in jobs if (j.submission_id or "").startswith(first["run_name"])] == [first["job_id"]]
    assert registry.load_model(cfg.registry_dir, first["run_name"])["path"] == first["model_path"]


def test_evaluate_and_promote_applies_the_gate(flows_setup, demo):
    path, cwd, cfg = str(flows_setup["path"]), flows_setup["cwd"], flows_setup["cfg"]
    run_cli("index", str(demo["day1"]), "-c", path, cwd=cwd)
    before = registry.current_release(cfg.registry_dir)
    refused = last_json(run_cli("flows", "run", "evaluate-and-promote", "-c", path, "--set", "evaluate.metric=exact",
                                "--set", "evaluate.min_score=1.0", cwd=cwd))
    assert not refused["promoted"] and "below evaluate.min_score" in refused["reason"]
    assert refused["candidate"]["n"] == 16 and 0 <= refused["candidate"]["recall"] <= 1
    assert registry.current_release(cfg.registry_dir) == before
    passed = last_json(run_cli("flows", "run", "evaluate-and-promote", "-c", path, "--set", "evaluate.max_regression=1.0",
                               cwd=cwd))
    assert passed["promoted"] and registry.current_release(cfg.registry_dir).release_id == passed["release_id"]
    assert registry.current_release(cfg.registry_dir).eval_report["f1"] == passed["candidate"]["f1"]
    again = last_json(run_cli("flows", "run", "evaluate-and-promote", "-c", path, cwd=cwd))
    assert not again["promoted"] and again["reason"] == "already serving this model and index"


def test_refresh_chains_reembed_finetune_and_promotion(flows_setup):
    path, cwd, cfg = str(flows_setup["path"]), flows_setup["cwd"], flows_setup["cfg"]
    out = last_json(run_cli("flows", "run", "refresh", "-c", path, "--set", "evaluate.max_regression=1.0", cwd=cwd))
    assert out["index"]["docs_failed"] == 0 and out["index"]["chunks_total"] > 0
    assert Path(out["finetune"]["model_path"], "model.safetensors").is_file()
    current = registry.current_release(cfg.registry_dir)
    assert out["promotion"]["release_id"] == current.release_id
    assert Path(current.model_path) == Path(out["finetune"]["model_path"])  # promoted now or already served


def test_bad_input_fails_once_and_a_transient_outage_is_retried(flows_setup, tmp_path):
    path, cwd = str(flows_setup["path"]), flows_setup["cwd"]
    bad = run_cli("flows", "run", "nightly-reembed", "-c", path, "--corpus", str(tmp_path / "missing"), cwd=cwd,
                  check=False)
    assert bad.returncode == 1 and "is not a directory" in bad.stderr
    # Milvus down when the run starts, up a few seconds later: the index task's retry succeeds
    down_cfg = load_config(write_config(tmp_path / "down.yaml", tmp_path / "data"))
    late = subprocess.Popen(
        [str(Path(sys.executable).parent / "tunedex"), "flows", "run", "nightly-reembed", "-c", path,
         "--set", f"milvus.uri={down_cfg.milvus.uri}"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    # start Milvus once the first attempt has failed (Prefect logs "Retry 1/N"), not after a fixed sleep:
    # the task reaches Milvus only after the embedder loads, which takes longer on a busy machine
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(late.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("Retry 1/" in line for line in lines) and late.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        services.start_milvus(down_cfg)
        out = late.stdout.read()
        late.wait(timeout=300)
        reader.join(timeout=10)
        err = "".join(lines)
    finally:
        services.stop_milvus(down_cfg)
    assert late.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["docs_added"] == 33
    with prefect_client(flows_setup["api"]) as client:
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
        from prefect.client.schemas.sorting import TaskRunSort

        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="index_task")),
                                     sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=2)
    latest, failed = runs[0], runs[1]
    assert latest.state.is_completed() and latest.run_count >= 2  # retried after the outage
    assert failed.state.is_failed() and failed.run_count == 1  # bad input: no retry
