"""S13: the endpoint's API key guards every route it serves but the probes."""

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.scenario("S13", "every served route (from /openapi.json) without a key, with wrong, Basic, empty and query-string keys")]

AUTH = {"Authorization": "Bearer test-key-123"}


def test_every_route_but_the_probes_requires_the_key(pipeline):
    from tunedex.serving.app import OPEN_ROUTES

    url = pipeline["cfg"].serve.url
    spec = httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()  # the routes the replica serves
    routes = [(path, m.upper()) for path, ops in spec["paths"].items() for m in ops] + [("/openapi.json", "GET")]
    assert {"/v1/query", "/v1/chat/completions", "/v1/completions", "/v1/models"} <= {p for p, _ in routes}
    for path, method in routes:
        resp = httpx.request(method, f"{url}{path}", json={}, timeout=30)
        assert resp.status_code == (200 if path in OPEN_ROUTES else 401), (method, path, resp.status_code)
