"""S13: the endpoint's API key guards every route it serves but the probes."""

import httpx
import pytest

from tunedex.serving.http import authorized

pytestmark = [pytest.mark.slow, pytest.mark.scenario(
    "S13", "every served route (read from /openapi.json) without a key and with 7 wrong forms of it; "
           "the openai client with a wrong key")]

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
WRONG = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdC1rZXktMTIz"},
         {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY.upper()}"},
         {"Authorization": f"bearer {KEY}"}, {"Authorization": f"Bearer  {KEY}"}, {"X-API-Key": KEY}]
# (a trailing space is refused by HTTP clients before sending; the unit test below covers it)


def test_every_route_but_the_probes_requires_the_key(pipeline, record_property):
    import openai

    from tunedex.serving.http import OPEN_ROUTES

    url = pipeline["cfg"].serve.url
    spec = httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()  # the routes the replica serves
    routes = [(path, m.upper()) for path, ops in spec["paths"].items() for m in ops]
    routes += [("/openapi.json", "GET"), ("/docs", "GET"), ("/metrics", "GET"), ("/no/such/route", "GET")]
    assert {"/v1/query", "/v1/chat/completions", "/v1/completions", "/v1/models"} <= {p for p, _ in routes}
    calls = 0
    with httpx.Client(timeout=60) as http:
        for path, method in routes:
            for headers in WRONG:
                resp = http.request(method, f"{url}{path}", json={}, headers=headers, params={"api_key": KEY})
                calls += 1
                if path in OPEN_ROUTES:
                    assert resp.status_code == 200, (method, path, resp.status_code)
                else:
                    assert resp.status_code == 401 and "error" in resp.json(), (method, path, headers, resp.status_code)
                    assert resp.headers["www-authenticate"] == "Bearer"
        assert http.get(f"{url}/v1/models", headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="tunedex", messages=[{"role": "user", "content": "hi"}])
    open_routes = sorted(p for p, _ in routes if p in OPEN_ROUTES)
    record_property("held", f"{calls} calls on {len(routes)} routes with no or a wrong key: 401 + JSON on every "
                            f"route but {', '.join(open_routes)}; the right key 200; openai client AuthenticationError")


def test_the_key_check_is_exact_and_constant_time(monkeypatch):
    import hmac

    assert authorized(f"Bearer {KEY}", KEY)
    for header in (None, "", "Bearer", f"Bearer {KEY} ", f"bearer {KEY}", f"Basic {KEY}", f"Bearer {KEY.upper()}",
                   f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"):
        assert not authorized(header, KEY), header
    # every token offered as a bearer, whatever its length or first differing byte, is compared by
    # hmac.compare_digest (its time depends on the lengths only), never by == (which stops at the first
    # differing byte); the spy passes the real function's answer through
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    tokens = [KEY, "x" + KEY[1:], KEY[:-1] + "x", KEY[:3], KEY + "tail", "", "\u00e9" * 4]
    answers = [authorized(f"Bearer {t}", KEY) for t in tokens]
    assert answers == [True] + [False] * (len(tokens) - 1)
    assert compared == [(t.encode(), KEY.encode()) for t in tokens]
