"""S12: the local Ray that tunedex starts refuses its Jobs API to callers without the token."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import run_cli
from tunedex.infra.doctor import assess, non_loopback_address
from tunedex.infra.services import port_open

pytestmark = [pytest.mark.slow, pytest.mark.scenario("S12", "Jobs and Serve API calls without a token, with a wrong one, with a browser Origin; a connect on the host address")]


def test_jobs_api_refuses_no_token_and_a_wrong_token_and_runs_nothing(stack, tmp_path, record_property):
    from tunedex.flows.finetune import job_client

    path, cfg = stack
    url = f"http://127.0.0.1:{cfg.ray.dashboard_port}"
    marker = tmp_path / "pwned"
    body = {"entrypoint": f"touch {marker}", "submission_id": f"s12-{time.time_ns()}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic d3Jvbmc="},
                    {"Origin": "http://evil.example", "User-Agent": "Mozilla/5.0"}):
        assert httpx.post(f"{url}/api/jobs/", json=body, headers=headers, timeout=10).status_code in (401, 403), headers
        assert httpx.delete(f"{url}/api/jobs/{body['submission_id']}", headers=headers, timeout=10).status_code in (401, 403)
        assert httpx.delete(f"{url}/api/serve/applications/", headers=headers, timeout=10).status_code in (401, 403)
    time.sleep(3)
    assert not marker.exists()
    client = job_client(cfg)
    assert body["submission_id"] not in {j.submission_id for j in client.list_jobs()}
    ok = client.submit_job(entrypoint=f"touch {marker}", submission_id=body["submission_id"])  # with the token: runs
    deadline = time.monotonic() + 60
    while client.get_job_status(ok).value not in ("SUCCEEDED", "FAILED") and time.monotonic() < deadline:
        time.sleep(1)
    assert client.get_job_status(ok).value == "SUCCEEDED" and marker.exists()
    record_property("held", "12 calls (job submit, job delete, Serve delete x no token, wrong Bearer, Basic, browser "
                            "Origin): all 401/403, marker never created, job not listed; the same submit with the "
                            "token ran")


def test_dashboard_listens_on_loopback_only(stack, record_property):
    _, cfg = stack
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to try")
    assert port_open("127.0.0.1", cfg.ray.dashboard_port) and not port_open(address, cfg.ray.dashboard_port)
    record_property("held", f"dashboard open on 127.0.0.1, refused on {address}")


def test_doctor_passes_on_the_stack_and_flags_what_would_be_open(stack, record_property):
    path, _ = stack
    out = run_cli("doctor", "-c", str(path), cwd=path.parent).stdout
    assert "ok    dashboard without a token: HTTP 401" in out or "ok    dashboard without a token: HTTP 403" in out
    bad = assess("2.50.0", "disabled", 200, 200, True, False, "0.0.0.0")
    assert not any(f.ok for f in bad)
    assert "no token auth" in bad[0].detail and "CVE-2026-27482" in assess("2.53.1", "token", 401, 401, False, True,
                                                                          "127.0.0.1")[0].detail
    assert all(f.ok for f in assess("2.60.0", "token", 401, 403, False, False, "127.0.0.1"))
    record_property("held", "tunedex doctor passes on the stack; flags Ray < 2.52 / < 2.54, auth off, an open "
                            "dashboard, 0.0.0.0")
