"""The HTTP layer (`serving/http.py`) without Ray: routes, key, limits, OpenAI shapes, and bad bodies that must
all get a 4xx with an OpenAI-style JSON error. `CannedRelease` stands in for the Ray deployments behind it."""

import json

import pytest
from fastapi.testclient import TestClient

from tunedex.infra.config import ServeConfig
from tunedex.serving.http import Answer, Completion, Problem, make_api

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
RELEASE = {"release_id": "rel-1", "created_at": "2025-01-02T03:04:05+00:00"}
SOURCES = [{"index": 1, "chunk_id": "c1", "doc_id": "d1", "doc_version": "v1", "score": 0.9, "text": "Ships free."}]
CHAT = {"model": "tunedex", "messages": [{"role": "user", "content": "When is shipping free?"}]}


class CannedRelease:
    release = RELEASE

    def __init__(self):
        self.calls: list[tuple] = []

    async def answer(self, question, mode, top_k, filters):
        self.calls.append(("answer", question, mode, top_k, filters))
        if filters == "bad":
            raise Problem(422, "filters 'bad' is not a valid Milvus expression", param="filters")
        return Answer(f"echo: {question}", SOURCES, "rel-1", mode, {"total": 1.0})

    async def complete(self, kind, payload, sampling):
        self.calls.append(("complete", kind, payload, sampling))
        return Completion("Over 50 dollars [1].", SOURCES, "rel-1", 12, sampling.max_new_tokens,
                          "length" if kind == "text" else "stop")

    async def stream(self, kind, payload, sampling):
        self.calls.append(("stream", kind, payload, sampling))

        async def pieces():
            for piece in ("Over ", "50 dollars", " [1]."):
                yield piece
        return Completion("", SOURCES, "rel-1"), pieces()


class CannedBackend:
    def __init__(self, served=None, pending=None):
        self.served, self.pending = served, pending

    def current(self):
        if self.served is None:
            raise Problem(503, "no release is being served yet", "service_unavailable")
        return self.served


def client(served=None, record=None, **settings) -> TestClient:
    cfg = ServeConfig(api_key=KEY, max_new_tokens=16, **settings)
    return TestClient(make_api(CannedBackend(served or CannedRelease()), cfg, record), raise_server_exceptions=False)


def assert_openai_error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json", resp.headers
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"], error
    return error


def test_query_answers_with_sources_and_refuses_bad_filters_in_both_error_shapes():
    served = CannedRelease()
    http = client(served)
    resp = http.post("/v1/query", json={"question": "q?", "mode": "retrieve", "top_k": 2}, headers=AUTH)
    assert resp.json() == {"answer": "echo: q?", "sources": SOURCES, "release_id": "rel-1", "mode": "retrieve",
                           "timings_ms": {"total": 1.0}}
    assert served.calls == [("answer", "q?", "retrieve", 2, "")]
    bad = http.post("/v1/query", json={"question": "q?", "filters": "bad"}, headers=AUTH)
    assert assert_openai_error(bad, 422)["param"] == "filters"
    assert "not a valid Milvus expression" in bad.json()["detail"]  # what /v1/query clients have read so far


def test_chat_and_completions_answer_in_openai_shapes_with_sources():
    served = CannedRelease()
    http = client(served)
    chat = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**9, "temperature": 0.5}, headers=AUTH).json()
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-") and chat["model"] == "rel-1"
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Over 50 dollars [1]."},
                                "finish_reason": "stop"}]
    assert chat["sources"] == SOURCES and chat["release_id"] == "rel-1"
    assert chat["usage"] == {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}
    sampling = served.calls[0][3]
    assert (sampling.max_new_tokens, sampling.temperature) == (16, 0.5)  # capped at serve.max_new_tokens
    text = http.post("/v1/completions", json={"prompt": ["Returns are"], "max_tokens": 3}, headers=AUTH).json()
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "Over 50 dollars [1]."
    assert text["choices"][0]["finish_reason"] == "length" and text["usage"]["completion_tokens"] == 3
    assert served.calls[1][1:3] == ("text", "Returns are") and served.calls[1][3].max_new_tokens == 3
    models = http.get("/v1/models", headers=AUTH).json()
    assert models == {"object": "list", "data": [{"id": "rel-1", "object": "model", "created": 1735787045,
                                                  "owned_by": "tunedex"}]}


@pytest.mark.parametrize("route, body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "Returns"})])
def test_a_stream_carries_the_sources_on_its_first_chunk_and_ends_with_done(route, body):
    with client().stream("POST", route, json={**body, "stream": True}, headers=AUTH) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["sources"] == SOURCES and chunks[0]["release_id"] == "rel-1"
    assert all("sources" not in c for c in chunks[1:]) and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    if route == "/v1/chat/completions":
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "Over 50 dollars [1]." and len({c["id"] for c in chunks}) == 1


def test_probes_are_open_and_every_other_route_needs_the_key():
    http = client()
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready", "release_id": "rel-1", "pending_release_id": None}
    for method, path in [("POST", "/v1/query"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/openapi.json"), ("GET", "/no/such/route")]:
        resp = http.request(method, path, json={}, headers={"Authorization": "Bearer wrong"})
        assert assert_openai_error(resp, 401)["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_no_release_yet_is_a_503_with_a_json_error():
    http = TestClient(make_api(CannedBackend(pending="rel-2"), ServeConfig()))
    assert assert_openai_error(http.get("/readyz"), 503)["code"] == "service_unavailable"
    assert_openai_error(http.post("/v1/chat/completions", json=CHAT), 503)


def test_requests_are_recorded_by_route_template_also_when_refused_before_routing():
    seen: list[tuple] = []
    http = client(record=lambda route, status, release_id, mode, ms: seen.append((route, status, release_id, mode)))
    http.post("/v1/query", json={"question": "q"})  # no key
    http.get("/no/such/route", headers=AUTH)
    http.post("/v1/query", json={"question": "q", "mode": "retrieve"}, headers=AUTH)
    assert seen == [("/v1/query", 401, "", ""), ("unmatched", 404, "", ""), ("/v1/query", 200, "rel-1", "retrieve")]


NESTED = b"[" * 10_000 + b"]" * 10_000
JSON = {"Content-Type": "application/json"}
# (name, route, raw body or JSON value, extra headers, status); each must be a 4xx with an OpenAI-style JSON error
BAD_BODIES = [
    ("lone surrogate in a JSON escape", "/v1/chat/completions",
     b'{"model":"tunedex","messages":[{"role":"user","content":"\\ud800"}]}', JSON, 400),
    ("reversed surrogate pair", "/v1/query", b'{"question":"\\udc00\\ud800"}', JSON, 400),
    ("invalid UTF-8 bytes", "/v1/query", b'{"question": "\xff\xfe\xfa"}', JSON, 400),
    ("a raw NUL byte in a string", "/v1/query", b'{"question": "a\x00b"}', JSON, 400),
    ("an escaped NUL in a question", "/v1/query", {"question": "a\u0000b"}, {}, 422),
    ("an escaped NUL in a message", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi\u0000"}]}, {}, 422),
    ("JSON nested 10k deep", "/v1/chat/completions", NESTED, JSON, 400),
    ("JSON nested 10k deep inside a field", "/v1/query", b'{"question": "q", "top_k": ' + NESTED + b"}", JSON, 400),
    ("invalid JSON", "/v1/query", b'{"question": ', JSON, 400),
    ("empty body", "/v1/query", b"", JSON, 400),
    ("empty body, no content type", "/v1/chat/completions", b"", {}, 400),
    ("a JSON list, not an object", "/v1/query", [1, 2], {}, 422),
    ("a JSON string, not an object", "/v1/chat/completions", "hi", {}, 422),
    ("null", "/v1/completions", b"null", JSON, 422),
    ("wrong content type", "/v1/query", b"question=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("text/plain JSON", "/v1/chat/completions", json.dumps(CHAT).encode(), {"Content-Type": "text/plain"}, 415),
    ("question a number", "/v1/query", {"question": 42}, {}, 422),
    ("top_k a string", "/v1/query", {"question": "q", "top_k": "many"}, {}, 422),
    ("unknown field on /v1/query", "/v1/query", {"question": "q", "shell": "rm -rf /"}, {}, 422),
    ("unknown OpenAI parameter", "/v1/chat/completions", {**CHAT, "tools": []}, {}, 400),
    ("unknown field in a message", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi", "extra": 1}]}, {}, 422),
    ("messages an object", "/v1/chat/completions", {"messages": {"role": "user", "content": "hi"}}, {}, 422),
    ("content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 42}]}, {}, 422),
    ("content a list of parts", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, {}, 422),
    ("stream='yes'", "/v1/chat/completions", {**CHAT, "stream": "yes"}, {}, 422),
    ("max_tokens a string", "/v1/chat/completions", {**CHAT, "max_tokens": "many"}, {}, 422),
    ("temperature=1e6", "/v1/chat/completions", {**CHAT, "temperature": 1e6}, {}, 422),
    ("n=1000", "/v1/chat/completions", {**CHAT, "n": 1000}, {}, 422),
    ("prompt a number", "/v1/completions", {"prompt": 7}, {}, 422),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, {}, 400),
    ("model a list", "/v1/chat/completions", {**CHAT, "model": ["tunedex"]}, {}, 422),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, {}, 404),
    ("no user message", "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, {}, 400),
    ("prompt over serve.max_prompt_chars", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "w" * 15_000}] * 2}, {}, 422),
    ("body over serve.max_body_bytes", "/v1/query", b"x" * 1_500_000, JSON, 413),
    ("1,000 headers", "/v1/query", {"question": "q"}, {f"x-h{i}": "v" for i in range(1000)}, 431),
]


@pytest.mark.parametrize("name, route, body, headers, status", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_a_4xx_with_an_openai_style_json_error(name, route, body, headers, status):
    served = CannedRelease()
    send = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = client(served).post(route, headers={**AUTH, **headers}, **send)
    error = assert_openai_error(resp, status)
    assert error["type"] == "invalid_request_error" and b"Traceback" not in resp.content
    assert served.calls == []  # refused before it reached the release


def test_errors_say_what_is_wrong_and_where():
    http = client()
    surrogate = http.post("/v1/chat/completions", headers={**AUTH, **JSON},
                          content=b'{"messages":[{"role":"user","content":"\\ud800"}]}').json()["error"]
    assert surrogate["code"] == "invalid_json" and "not valid JSON" in surrogate["message"]
    typed = http.post("/v1/query", headers=AUTH, json={"question": "q", "top_k": 0, "mode": "shell"}).json()
    assert typed["error"]["param"] == "top_k" and "mode: Input should be" in typed["error"]["message"]
    nul = http.post("/v1/query", headers=AUTH, json={"question": "a\u0000"}).json()["error"]
    assert nul["param"] == "question" and "NUL" in nul["message"]
    assert assert_openai_error(http.get("/v1/chat/completions", headers=AUTH), 405)["code"] == "method_not_allowed"


def test_a_failure_inside_the_release_is_a_json_500_not_plain_text():
    class Broken(CannedRelease):
        async def answer(self, *args):
            raise RuntimeError("boom")

    resp = client(Broken()).post("/v1/query", json={"question": "q"}, headers=AUTH)
    error = assert_openai_error(resp, 500)
    assert error["type"] == "server_error" and "boom" not in resp.text
