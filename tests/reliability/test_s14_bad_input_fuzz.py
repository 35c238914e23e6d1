"""S14: request limits and bad inputs get clear 4xx errors, never a 5xx, and the endpoint keeps serving."""

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.scenario("S14", "oversized, chunked, malformed and out-of-range requests, sent once each")]

AUTH = {"Authorization": "Bearer test-key-123"}


def test_oversized_bodies_and_prompts_get_clear_4xx(pipeline):
    url = pipeline["cfg"].serve.url
    big = httpx.post(f"{url}/v1/query", content=b"x" * 1_500_000, headers={**AUTH, "Content-Type": "application/json"},
                     timeout=60)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large", (big.status_code, big.text[:300])

    def chunked():
        for _ in range(30):
            yield b"y" * 50_000

    streamed = httpx.post(f"{url}/v1/query", content=chunked(), headers={**AUTH, "Content-Type": "application/json"},
                          timeout=60)
    assert streamed.status_code == 413
    long_chat = {"messages": [{"role": "user", "content": "word " * 3900}] * 2}
    resp = httpx.post(f"{url}/v1/chat/completions", json=long_chat, headers=AUTH, timeout=60)
    assert resp.status_code == 422 and "serve.max_prompt_chars" in resp.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/query", json={"question": "When is shipping free?", "mode": "retrieve"},
                    headers=AUTH, timeout=60)
    assert ok.status_code == 200  # the endpoint is fine afterwards
