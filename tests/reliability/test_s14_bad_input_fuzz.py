"""S14: request limits and bad inputs get clear 4xx errors (OpenAI-style JSON), never a 5xx, and the endpoint keeps
serving. The same bodies are checked without Ray in tests/test_http_units.py."""

import json
import socket
from urllib.parse import urlparse

import httpx
import pytest

from conftest import ray_rss_mb

pytestmark = [pytest.mark.slow, pytest.mark.scenario(
    "S14", "42 malformed, oversized and out-of-range requests sent once each (50 MB upload, 1,000 headers, a 1 MB header, "
           "JSON nested 10k deep, lone surrogates, invalid UTF-8, NUL bytes, sampling parameters out of range...)")]

AUTH = {"Authorization": "Bearer test-key-123"}
CHAT = {"messages": [{"role": "user", "content": "When is shipping free?"}], "max_tokens": 4}


# Refused by Serve's HTTP server (uvicorn) before tunedex sees them: a 400 with its plain-text body.
HTTP_SERVER_ANSWERS = {"lying Content-Length (shorter than the body)"}


def chat(**changes):
    return {**CHAT, **changes}


def raw_request(url: str, head: str, body: bytes = b"", send_more: int = 0) -> tuple[int, bytes]:
    """One request over a plain socket (what httpx will not send: lying lengths, a body the server refuses
    mid-upload); returns the status and the response body."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        try:
            for _ in range(send_more // 65536):
                sock.sendall(b"x" * 65536)
        except OSError:
            pass  # the server answered and closed before taking it all: what we want
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_bad_requests_get_clear_4xx_and_nothing_breaks(pipeline, record_property):
    url = pipeline["cfg"].serve.url
    http = httpx.Client(timeout=120)
    post = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key-123\r\n" \
           "Content-Type: application/json\r\n"
    nested = "[" * 10_000 + "]" * 10_000
    cases: list[tuple[str, object]] = [
        ("body over the limit (1.5 MB)", lambda: http.post(f"{url}/v1/query", content=b"x" * 1_500_000,
                                                           headers={**AUTH, "Content-Type": "application/json"})),
        ("chunked body over the limit", lambda: http.post(f"{url}/v1/query", content=(b"y" * 50_000 for _ in range(30)),
                                                           headers={**AUTH, "Content-Type": "application/json"})),
        ("1,000 headers", lambda: http.post(f"{url}/v1/chat/completions", json=CHAT,
                                             headers={**AUTH, **{f"x-h{i}": "v" for i in range(1000)}})),
        ("a 1 MB header", lambda: http.post(f"{url}/v1/chat/completions", json=CHAT,
                                             headers={**AUTH, "x-big": "a" * 2**20})),
        ("non-UTF-8 body", lambda: http.post(f"{url}/v1/query", content=b'{"question": "\xff\xfe\xfa"}',
                                              headers={**AUTH, "Content-Type": "application/json"})),
        ("non-UTF-8 chat body", lambda: http.post(f"{url}/v1/chat/completions", content=b'{"messages": "\xc3\x28"}',
                                                   headers={**AUTH, "Content-Type": "application/json"})),
        ("lone surrogate in a JSON escape", lambda: http.post(f"{url}/v1/chat/completions", headers={
            **AUTH, "Content-Type": "application/json"},
            content=b'{"model":"tunedex","messages":[{"role":"user","content":"\\ud800"}]}')),
        ("reversed surrogate pair in a question", lambda: http.post(f"{url}/v1/query", content=b'{"question": "\\udc00\\ud800"}',
                                                                    headers={**AUTH, "Content-Type": "application/json"})),
        ("a raw NUL byte in a string", lambda: http.post(f"{url}/v1/query", content=b'{"question": "a\x00b"}',
                                                          headers={**AUTH, "Content-Type": "application/json"})),
        ("an escaped NUL in a message", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH,
                                                           json=chat(messages=[{"role": "user", "content": "hi\u0000"}]))),
        ("JSON nested 10k deep", lambda: http.post(f"{url}/v1/chat/completions", content=nested.encode(),
                                                    headers={**AUTH, "Content-Type": "application/json"})),
        ("invalid JSON", lambda: http.post(f"{url}/v1/query", content=b'{"question": ',
                                            headers={**AUTH, "Content-Type": "application/json"})),
        ("empty body", lambda: http.post(f"{url}/v1/query", content=b"", headers={**AUTH, "Content-Type": "application/json"})),
        ("a JSON list, not an object", lambda: http.post(f"{url}/v1/query", json=[1, 2], headers=AUTH)),
        ("a JSON string, not an object", lambda: http.post(f"{url}/v1/chat/completions", json="hi", headers=AUTH)),
        ("an unknown field on /v1/query", lambda: http.post(f"{url}/v1/query", headers=AUTH,
                                                             json={"question": "q", "mode": "retrieve", "shell": "ls"})),
        ("an unknown field in a message", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH, json=chat(
            messages=[{"role": "user", "content": "hi", "name": {"x": 1}}]))),
        ("wrong content type", lambda: http.post(f"{url}/v1/query", content=b"question=hi",
                                                  headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})),
        ("100k messages", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH,
                                             json={"messages": [{"role": "user", "content": "a"}] * 100_000})),
        ("300 messages (over the 256 cap)", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH,
                                                              json={"messages": [{"role": "user", "content": "a"}] * 300})),
        ("prompt over serve.max_prompt_chars", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH, json={
            "messages": [{"role": "user", "content": "word " * 3900}] * 2})),
        ("a message over 20,000 characters", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH,
                                                               json=chat(messages=[{"role": "user", "content": "w" * 30_000}]))),
        ("n=1000", lambda: http.post(f"{url}/v1/chat/completions", json=chat(n=1000), headers=AUTH)),
        ("temperature=1e6", lambda: http.post(f"{url}/v1/chat/completions", json=chat(temperature=1e6), headers=AUTH)),
        ("top_p=-1", lambda: http.post(f"{url}/v1/chat/completions", json=chat(top_p=-1), headers=AUTH)),
        ("logprobs=-1", lambda: http.post(f"{url}/v1/chat/completions", json=chat(logprobs=-1), headers=AUTH)),
        ("max_tokens=0", lambda: http.post(f"{url}/v1/chat/completions", json=chat(max_tokens=0), headers=AUTH)),
        ("max_tokens a string", lambda: http.post(f"{url}/v1/chat/completions", json=chat(max_tokens="many"), headers=AUTH)),
        ("unknown model", lambda: http.post(f"{url}/v1/chat/completions", json=chat(model="gpt-4o"), headers=AUTH)),
        ("role 'tool'", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH,
                                           json=chat(messages=[{"role": "tool", "content": "x"}]))),
        ("no user message", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH,
                                               json=chat(messages=[{"role": "system", "content": "x"}]))),
        ("content a number", lambda: http.post(f"{url}/v1/chat/completions", headers=AUTH,
                                                json=chat(messages=[{"role": "user", "content": 42}]))),
        ("stream='yes'", lambda: http.post(f"{url}/v1/chat/completions", json=chat(stream="yes"), headers=AUTH)),
        ("two prompts in one completion", lambda: http.post(f"{url}/v1/completions", headers=AUTH,
                                                             json={"prompt": ["a", "b"], "max_tokens": 2})),
        ("echo on a completion", lambda: http.post(f"{url}/v1/completions", headers=AUTH,
                                                    json={"prompt": "a", "echo": True})),
        ("empty question", lambda: http.post(f"{url}/v1/query", json={"question": ""}, headers=AUTH)),
        ("top_k=10**6", lambda: http.post(f"{url}/v1/query", json={"question": "q", "top_k": 10**6}, headers=AUTH)),
        ("unknown mode", lambda: http.post(f"{url}/v1/query", json={"question": "q", "mode": "shell"}, headers=AUTH)),
        ("malformed filter", lambda: http.post(f"{url}/v1/query", headers=AUTH,
                                                json={"question": "q", "mode": "retrieve", "filters": "doc_id in ["})),
        ("GET on a POST route", lambda: http.get(f"{url}/v1/chat/completions", headers=AUTH)),
        ("lying Content-Length (shorter than the body)", lambda: raw_request(
            url, post + "Content-Length: 5\r\n", json.dumps(CHAT).encode())),
    ]
    def rss_mb(title: str) -> float:
        return ray_rss_mb(pipeline["cfg"], title)

    ingress_before, proxy_before = rss_mb("ServeReplica:tunedex:Ingress"), rss_mb("ProxyActor")
    fifty_mb = raw_request(url, post + f"Content-Length: {50 * 2**20}\r\n", b"{", send_more=50 * 2**20)
    rss_growth = rss_mb("ServeReplica:tunedex:Ingress") - ingress_before
    proxy_growth = rss_mb("ProxyActor") - proxy_before
    outcomes = [("50 MB upload", *fifty_mb)]
    for name, send in cases:
        out = send()
        outcomes.append((name, *out) if isinstance(out, tuple) else (name, out.status_code, out.content))
    bad = []
    for name, status, body in outcomes:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        error = parsed.get("error") if isinstance(parsed, dict) else None  # OpenAI's shape, on every route
        clear = isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and error["message"] \
            or name in HTTP_SERVER_ANSWERS
        if not (400 <= status < 500 and clear and b"Traceback" not in body):
            bad.append((name, status, body[:200]))
    assert not bad, bad
    statuses = {name: status for name, status, _ in outcomes}
    assert statuses["50 MB upload"] == statuses["body over the limit (1.5 MB)"] == 413
    assert statuses["chunked body over the limit"] == 413 and statuses["1,000 headers"] == 431
    assert statuses["a 1 MB header"] == 431 and statuses["unknown model"] == 404
    # Ours never buffers a refused body. Ray's proxy reads a body ahead of the app into an unbounded queue
    # (serve/_private/proxy.py, proxy_asgi_receive) until the response is sent: its growth is recorded, and
    # docs/reliability.md says to cap bodies in front of Serve (an ingress `client_max_body_size`).
    assert rss_growth < 20, f"the Ingress replica grew {rss_growth:.1f} MB across the 50 MB upload"
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    ok = http.post(f"{url}/v1/chat/completions", json=chat(max_tokens=10**9), headers=AUTH, timeout=120)
    assert ok.status_code == 200  # max_tokens is capped at serve.max_new_tokens (documented), then it serves
    assert 0 < ok.json()["usage"]["completion_tokens"] <= pipeline["cfg"].serve.max_new_tokens
    record_property("held", f"{len(outcomes)} bad requests: all 4xx with an OpenAI-style JSON error, 0 x 5xx, no traceback "
                            f"(413 x{list(statuses.values()).count(413)}, 431 x{list(statuses.values()).count(431)}, "
                            f"422 x{list(statuses.values()).count(422)}); across a 50 MB upload the Ingress replica grew "
                            f"{rss_growth:.1f} MB, Ray's proxy {proxy_growth:.1f} MB (it queues bodies ahead of the app); "
                            "/readyz 200 and a normal request served afterwards")
