"""S9: a burst over the model's queue gets 503s with a JSON error and Retry-After, never a 500; abandoned
streams leak no slot.

Timings are recorded, not asserted: how long a refusal takes to come back ("< 1 s" in the scenario) and how soon
the slots are free again ("within 5 s") measure the machine's load as much as tunedex. What is asserted holds on
a slow machine too: every refusal is Serve's backpressure (never a 500 or a client timeout), and after the
abandoned streams exactly max_ongoing + max_queued requests at once are all served, which a single leaked slot
would make one of them refused."""

import asyncio
import json
import re
import time

import httpx
import pytest

from conftest import ray_rss_mb, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.scenario(
    "S9", "Generator and Release max_ongoing_requests=2, max_queued_requests=4; 64 simultaneous requests, then "
          "16 streams abandoned mid-answer")]

AUTH = {"Authorization": "Bearer test-key-123"}
# The model holds 2 requests and queues 4; the Release (one request end to end) admits as many, so a refused
# request is refused before it costs a retrieval.
MAX_ONGOING, MAX_QUEUED = 2, 4
LIMIT = json.dumps({"max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_QUEUED,
                    "backpressure_config": {"status_code": 503, "retry_after_s": 2}})
LIMITS = f'serve.deployments={{"Generator": {LIMIT}, "Release": {LIMIT}}}'


async def burst(url: str, n: int) -> list[tuple[int, float, dict, str]]:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int):
            started = time.perf_counter()
            resp = await client.post(f"{url}/v1/query", headers=AUTH, json={"question": f"When is shipping free? #{i}"})
            return resp.status_code, time.perf_counter() - started, resp.json(), resp.headers.get("retry-after", "")
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_a_burst_over_the_queue_is_refused_cleanly_and_slots_come_back(pipeline, record_property):
    cfg, path, cwd = pipeline["cfg"], str(pipeline["path"]), pipeline["cwd"]
    url = cfg.serve.url
    before = httpx.get(f"{url}/readyz", timeout=10).json()["release_id"]
    model = json.loads((cfg.registry_dir / "releases" / f"{before}.json").read_text())["model_path"]
    out = run_cli("promote", "--model", model, "-c", path, "--set", LIMITS, "--set", "serve.max_batch_size=2",
                  cwd=cwd).stdout
    limited = re.search(r"promoted (rel-\S+):", out).group(1)
    try:
        assert httpx.get(f"{url}/readyz", timeout=10).json()["release_id"] == limited
        rss_before = ray_rss_mb(pipeline["cfg"], "ProxyActor")
        results = asyncio.run(burst(url, 64))
        statuses = [r[0] for r in results]
        refused = [r for r in results if r[0] != 200]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        assert refused, "nothing was refused: the burst did not exceed the queue"
        assert statuses.count(200) >= MAX_ONGOING + MAX_QUEUED  # the running and the queued are all served
        for status, seconds, body, retry_after in refused:
            assert "backpressure" in body["detail"] and retry_after == "2", (status, body, retry_after)
        slowest_refusal = max(r[1] for r in refused)  # recorded: the scenario's "< 1 s" is the machine's figure

        abandoned = 0
        with httpx.Client(timeout=60) as http:
            for _ in range(16):
                with http.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, json={
                        "stream": True, "max_tokens": 64,
                        "messages": [{"role": "user", "content": "Tell me everything about the Quartz lamp"}]}) as resp:
                    assert resp.status_code == 200
                    next(resp.iter_lines())  # the first event, then the client goes away mid-answer
                    abandoned += 1
        # every slot is free again: as many requests at once as the Release runs and queues are all served (one
        # leaked slot refuses one of them). Serve's router may briefly see a replica's old queue length, so the
        # probe is repeated until it holds; a leak never clears, and the generous deadline only bounds the wait.
        abandoned_at, probes, freed = time.monotonic(), [], False
        while not freed and time.monotonic() < abandoned_at + 120:
            probe = [r[0] for r in asyncio.run(burst(url, MAX_ONGOING + MAX_QUEUED))]
            probes.append(probe)
            freed = probe == [200] * (MAX_ONGOING + MAX_QUEUED)
            if not freed:
                time.sleep(1)
        freed_s = time.monotonic() - abandoned_at
        assert freed, f"a slot stayed taken after the abandoned streams: {len(probes)} probes, the last {probes[-1]}"
        assert all(set(p) <= {200, 503} for p in probes), probes
        with httpx.Client(timeout=60) as http:
            sequential = [http.post(f"{url}/v1/query", headers=AUTH, json={"question": "When is shipping free?"}
                                    ).status_code for _ in range(20)]
        assert sequential == [200] * 20
        growth = ray_rss_mb(pipeline["cfg"], "ProxyActor") - rss_before
        assert growth < 50, f"the proxy grew {growth:.1f} MB"
        record_property("held", f"64 at once: {statuses.count(200)} x 200, {len(refused)} x 503 + JSON + Retry-After "
                                f"(slowest refusal {slowest_refusal * 1000:.0f} ms), 0 x 500; {abandoned} abandoned "
                                f"streams leaked no slot: {MAX_ONGOING + MAX_QUEUED} at once all served "
                                f"{freed_s:.1f} s after them ({len(probes)} probe(s)); 20/20 sequential 200; proxy RSS "
                                f"+{growth:.1f} MB")
    finally:
        run_cli("promote", before, "-c", path, cwd=cwd)  # back to the release the other scenarios use
