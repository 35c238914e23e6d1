"""The README's path, command by command, on the real stack: index -> finetune -> promote -> serve -> ask,
then the nightly flow on Prefect's local API brings in day 2."""

import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

README_COMMANDS = ["tunedex up", "tunedex demo-data", "tunedex index", "tunedex finetune", "tunedex promote",
                   "tunedex serve", "tunedex ask", "tunedex flows run nightly-reembed", "tunedex status",
                   "tunedex config check", "make demo", "make test"]


@pytest.fixture(scope="module")
def pipeline(stack, demo):
    path, cfg = stack
    cwd = path.parent
    out = {"cfg": cfg, "path": path, "cwd": cwd}
    out["check"] = run_cli("config", "check", str(path), cwd=cwd)
    out["index"] = run_cli("index", str(demo["day1"]), "-c", str(path), cwd=cwd)
    out["finetune"] = run_cli("finetune", str(path), "finetune.max_steps=30", cwd=cwd)
    out["promote"] = run_cli("promote", "-c", str(path), cwd=cwd)
    out["serve"] = run_cli("serve", "-c", str(path), cwd=cwd)
    return out


def test_readme_documents_the_commands_exercised_here():
    readme = (REPO / "README.md").read_text()
    missing = [c for c in README_COMMANDS if c not in readme]
    assert not missing, f"README lacks {missing}"


def test_index_and_finetune_print_their_summaries(pipeline):
    assert re.search(r"indexed \w+: docs \+33 ~0 -0 =0 failed 0", pipeline["index"].stdout)
    summary = [line for line in pipeline["finetune"].stdout.splitlines() if line.startswith("fine-tuned ")][-1]
    m = re.match(r"fine-tuned (\S+): 30 steps, loss ([\d.]+) -> ([\d.]+), eval loss [\d.]+, \d+ tokens/s, \d+s -> (\S+)",
                 summary)
    assert m, summary
    first, last = float(m.group(2)), float(m.group(3))
    assert last < 0.6 * first, f"the loss did not fall: {first} -> {last}"
    model_dir = Path(m.group(4))
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["base_model"] == "tiny" and len(card["data_hash"]) == 32


AUTH = {"Authorization": "Bearer test-key-123"}


def test_endpoint_requires_its_api_key_except_on_probes(pipeline):
    url = pipeline["cfg"].serve.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="},
                    {"Authorization": "Bearer"}, {"Authorization": "bearer test-key-123"}):
        resp = httpx.post(f"{url}/v1/query", json={"question": "hi"}, headers=headers, timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error", headers
    assert httpx.post(f"{url}/v1/query?api_key=test-key-123", json={"question": "hi"}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def test_endpoint_answers_with_sources_over_http(pipeline):
    cfg = pipeline["cfg"]
    release = re.search(r"promoted (rel-\S+):", pipeline["promote"].stdout).group(1)
    assert f"serving {release} at {cfg.serve.url}" in pipeline["serve"].stdout
    resp = httpx.post(f"{cfg.serve.url}/v1/query", json={"question": "When is shipping free?"}, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["release_id"] == release and body["mode"] == "hybrid"
    assert isinstance(body["answer"], str) and body["answer"]
    assert len(body["sources"]) == cfg.serve.top_k
    top = body["sources"][0]
    assert top["doc_id"] == "policies.jsonl#policy-shipping" and "ship for free" in top["text"]
    assert set(top) == {"index", "chunk_id", "doc_id", "doc_version", "score", "text"}
    assert set(body["timings_ms"]) == {"retrieve", "generate", "total"}
    only = httpx.post(f"{cfg.serve.url}/v1/query", json={"question": "Quartz", "mode": "retrieve", "top_k": 2},
                      headers=AUTH, timeout=60)
    assert only.status_code == 200 and only.json()["answer"] == "" and len(only.json()["sources"]) == 2
    bad = httpx.post(f"{cfg.serve.url}/v1/query", json={"question": "", "mode": "nope"}, headers=AUTH, timeout=10)
    assert bad.status_code == 422
    assert httpx.get(f"{cfg.serve.url}/healthz", timeout=10).json() == {"status": "ok"}


def test_ask_prints_answer_and_sources(pipeline):
    out = run_cli("ask", "How many days do I have to return an item?", "-c", str(pipeline["path"]), cwd=pipeline["cwd"]).stdout
    assert out.startswith("Q: How many days") and "\nA: " in out
    assert "] policies.jsonl#policy-returns @" in out


def test_status_shows_services_and_release(pipeline):
    out = run_cli("status", "-c", str(pipeline["path"]), cwd=pipeline["cwd"]).stdout
    assert "milvus  up" in out and "ray     up" in out and "token auth on" in out
    assert "release rel-" in out and "serve   up" in out


def test_nightly_flow_reembeds_day2_on_prefect_local_api(pipeline, demo):
    proc = run_cli("flows", "run", "nightly-reembed", "-c", str(pipeline["path"]), "--corpus", str(demo["day2"]),
                   cwd=pipeline["cwd"])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["docs_added"], report["docs_removed"], report["docs_failed"]) == (3, 2, 0)
    assert report["docs_changed"] > 0 and report["chunks_embedded"] > 0
    assert "Finished in state Completed" in proc.stderr + proc.stdout
    # the endpoint reads the same index: a discontinued product is gone from its sources
    cfg = pipeline["cfg"]
    body = httpx.post(f"{cfg.serve.url}/v1/query", json={"question": "Meridian Mouse 112", "mode": "retrieve",
                                                        "top_k": 10}, headers=AUTH, timeout=60).json()
    day2_ids = {p.relative_to(demo["day2"]).as_posix() for p in demo["day2"].rglob("*.md")}
    assert all(s["doc_id"] in day2_ids or s["doc_id"].startswith("policies.jsonl#") for s in body["sources"])


def test_bad_inputs_fail_with_clear_messages(pipeline, tmp_path):
    cwd, path = pipeline["cwd"], str(pipeline["path"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve: {port: high}\n")
    proc = run_cli("config", "check", str(bad), cwd=cwd, check=False)
    assert proc.returncode == 2 and "serve.port: expected an integer" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("index", str(tmp_path / "nope"), "-c", path, cwd=cwd, check=False)
    assert proc.returncode == 1 and "is not a directory" in proc.stderr
    proc = run_cli("promote", "--model", str(tmp_path), "-c", path, cwd=cwd, check=False)
    assert proc.returncode == 1 and "no *.safetensors weights" in proc.stderr
    train = tmp_path / "t.jsonl"
    train.write_text('{"text": "ok"}\nnot json\n')
    proc = run_cli("finetune", path, f"finetune.train_file={train}", cwd=cwd, check=False)
    assert proc.returncode == 1 and "line 2:" in proc.stderr and "Traceback" not in proc.stderr


def test_openai_client_chat_streaming_models_and_errors(pipeline):
    import openai

    cfg = pipeline["cfg"]
    client = openai.OpenAI(base_url=f"{cfg.serve.url}/v1", api_key="test-key-123", max_retries=0, timeout=60)
    release = client.models.list().data[0].id
    assert release.startswith("rel-")

    done = client.chat.completions.create(model=release, max_tokens=16,
                                          messages=[{"role": "user", "content": "When is shipping free?"}])
    assert done.model == release and done.choices[0].message.role == "assistant"
    assert isinstance(done.choices[0].message.content, str)
    sources = done.model_extra["sources"]  # kept by the client as an extra field
    assert sources[0]["doc_id"] == "policies.jsonl#policy-shipping" and sources[0]["index"] == 1

    chunks = list(client.chat.completions.create(model=release, stream=True, max_tokens=16,
                                                 messages=[{"role": "user", "content": "When is shipping free?"}]))
    assert chunks[0].model_extra["sources"][0]["doc_id"] == "policies.jsonl#policy-shipping"
    assert chunks[-1].choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() == done.choices[0].message.content  # greedy: the same text, streamed

    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=release, messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cfg.serve.url}/v1", api_key="wrong", max_retries=0).models.list()


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


def test_every_route_but_the_probes_requires_the_key(pipeline):
    from tunedex.serving.app import OPEN_ROUTES

    url = pipeline["cfg"].serve.url
    spec = httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()  # the routes the replica serves
    routes = [(path, m.upper()) for path, ops in spec["paths"].items() for m in ops] + [("/openapi.json", "GET")]
    assert {"/v1/query", "/v1/chat/completions", "/v1/completions", "/v1/models"} <= {p for p, _ in routes}
    for path, method in routes:
        resp = httpx.request(method, f"{url}{path}", json={}, timeout=30)
        assert resp.status_code == (200 if path in OPEN_ROUTES else 401), (method, path, resp.status_code)


def test_openai_client_text_completions_with_sources(pipeline):
    import openai

    cfg = pipeline["cfg"]
    client = openai.OpenAI(base_url=f"{cfg.serve.url}/v1", api_key="test-key-123", max_retries=0, timeout=60)
    done = client.completions.create(model="tunedex", prompt="Shipping is free", max_tokens=8)
    assert done.object == "text_completion" and done.model.startswith("rel-")
    assert done.model_extra["sources"][0]["doc_id"] == "policies.jsonl#policy-shipping"
    chunks = list(client.completions.create(model="tunedex", prompt="Shipping is free", max_tokens=8, stream=True))
    assert chunks[0].model_extra["sources"] == done.model_extra["sources"]
    assert "".join(c.choices[0].text for c in chunks).strip() == done.choices[0].text
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tunedex", prompt="x", echo=True)
    with pytest.raises(openai.BadRequestError, match="one prompt per request"):
        client.completions.create(model="tunedex", prompt=["a", "b"])


def test_rag_mode_without_a_loaded_base_model_is_a_clear_400(pipeline):
    url = pipeline["cfg"].serve.url
    resp = httpx.post(f"{url}/v1/query", json={"question": "When is shipping free?", "mode": "rag"}, headers=AUTH,
                      timeout=60)
    assert resp.status_code == 400 and "serve.serve_base_model" in resp.json()["detail"]


def test_request_metrics_are_exported_by_route_status_and_release(pipeline):
    cfg = pipeline["cfg"]
    httpx.post(f"{cfg.serve.url}/v1/query", json={"question": "Quartz", "mode": "retrieve"}, headers=AUTH, timeout=60)
    httpx.post(f"{cfg.serve.url}/v1/query", json={"question": "Quartz"}, timeout=60)  # 401
    deadline, text = time.monotonic() + 60, ""
    wanted = [r'ray_tunedex_requests_total\{[^}]*route="/v1/query"[^}]*status="200"',
              r'ray_tunedex_request_errors_total\{[^}]*route="/v1/query"[^}]*status="401"',
              r'ray_tunedex_request_latency_ms_bucket\{[^}]*release_id="rel-', r"ray_serve_num_http_requests_total"]
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{cfg.ray.metrics_export_port}/metrics", timeout=10).text
        if all(re.search(w, text) for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if not re.search(w, text)]
    assert not missing, missing


def test_release_swap_under_load_drops_nothing(pipeline, tmp_path):
    """promote A -> B, rollback -> A, two broken releases refused, promote B again (cold load), all while
    clients query and stream; every answer names the release that produced it."""
    import openai

    cfg, path, cwd = pipeline["cfg"], str(pipeline["path"]), pipeline["cwd"]
    url = cfg.serve.url
    a = httpx.get(f"{url}/readyz", timeout=10).json()["release_id"]
    model_a = Path(json.loads((cfg.registry_dir / "releases" / f"{a}.json").read_text())["model_path"])
    model_b = tmp_path / "model-b"
    shutil.copytree(model_a, model_b)
    results: list[tuple[str, int, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def query_loop() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                try:
                    resp = http.post(f"{url}/v1/query", json={"question": "When is shipping free?"}, headers=AUTH)
                    results.append(("query", resp.status_code, resp.json().get("release_id", "")))
                except Exception as exc:  # noqa: BLE001 - every failure is what this test counts
                    failures.append(repr(exc))

    def stream_loop() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key-123", max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                chunks = list(client.chat.completions.create(
                    model="tunedex", stream=True, max_tokens=24,
                    messages=[{"role": "user", "content": "Tell me about the Quartz lamp"}]))
                models = {c.model for c in chunks}
                ok = chunks[-1].choices[0].finish_reason == "stop" and len(models) == 1
                results.append(("stream", 200 if ok else 0, chunks[0].model_extra["release_id"]))
            except Exception as exc:  # noqa: BLE001
                failures.append(repr(exc))

    threads = [threading.Thread(target=query_loop) for _ in range(3)] + [threading.Thread(target=stream_loop)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        out = run_cli("promote", "--model", str(model_b), "-c", path, "--set", "serve.serve_base_model=true",
                      cwd=cwd).stdout
        b = re.search(r"promoted (rel-\S+):", out).group(1)
        assert "the endpoint now serves it" in out and b != a
        assert httpx.get(f"{url}/readyz", timeout=10).json()["release_id"] == b
        rag = httpx.post(f"{url}/v1/query", json={"question": "When is shipping free?", "mode": "rag"},
                         headers=AUTH, timeout=60)
        assert rag.status_code == 200 and rag.json()["release_id"] == b  # B loaded its base model too
        time.sleep(2)
        assert f"rolled back to {a}" in run_cli("rollback", "-c", path, cwd=cwd).stdout
        assert httpx.get(f"{url}/readyz", timeout=10).json()["release_id"] == a
        broken = tmp_path / "model-c"
        shutil.copytree(model_a, broken)
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
        proc = run_cli("promote", "--model", str(broken), "-c", path, cwd=cwd, check=False)
        assert proc.returncode == 1 and "unreadable" in proc.stderr and "Traceback" not in proc.stderr
        (broken / "model.safetensors").write_bytes((model_a / "model.safetensors").read_bytes())
        (broken / "config.json").write_text('{"model_type": "gpt2", "n_embd": "many"}')
        proc = run_cli("promote", "--model", str(broken), "-c", path, cwd=cwd, check=False)
        assert proc.returncode == 1 and "failed to start" in proc.stderr and "serving release keeps serving" in proc.stderr
        assert httpx.get(f"{url}/readyz", timeout=10).json()["release_id"] == a
        run_cli("promote", b, "-c", path, cwd=cwd)  # B was retired to make room for the broken one: a cold load
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert not failures, failures[:5]
    assert all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:5]
    served = {release for _, _, release in results}
    assert served == {a, b}, served
    assert len(results) > 20
    assert httpx.get(f"{url}/readyz", timeout=10).json()["release_id"] == b


def test_report_measures_four_strategies_with_intervals(pipeline, demo, tmp_path):
    cfg, path, cwd = pipeline["cfg"], str(pipeline["path"]), pipeline["cwd"]
    out = run_cli("report", "-c", path, "--qa", str(demo["qa_day2"]), "--max-questions", "24", "--out", str(tmp_path),
                  "--set", "evaluate.style_pattern=^Thanks for asking!", cwd=cwd).stdout
    assert "| strategy | split | n | f1 (95% CI) |" in out and "\nrecommendation: " in out
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["strategies"]) == {"base", "finetuned", "rag", "hybrid"} and data["n"] == 24
    hybrid, finetuned = data["strategies"]["hybrid"], data["strategies"]["finetuned"]
    assert hybrid["ci"]["recall"][0] > 0.5  # retrieval finds the supporting document for most questions
    assert "recall" not in finetuned and "attribution" in hybrid
    for s in data["strategies"].values():
        lo, hi = s["ci"]["f1"]
        assert lo <= s["f1"] <= hi and s["latency_ms"]["p50"] > 0 and s["cost_per_1k_usd"] > 0
        assert set(s["by_split"]) <= {"static", "changed"} and len(s["rows"]) == 24
    assert data["one_off"]["corpus_chunks"] > 0 and data["one_off"]["finetune_usd"] > 0
    assert (tmp_path / "report.html").read_text().count("<svg") == 3
