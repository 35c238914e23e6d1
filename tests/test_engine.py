"""The vLLM generation engine (serving/engine.py) on a tiny model built from a config: on its own, and behind
the real endpoint, where a client that leaves mid-stream must abort its request in the engine."""

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import run_cli

AUTH = {"Authorization": "Bearer test-key-123"}


def long_context_model(path: Path) -> Path:
    """Random weights, a 4096-token context: it rarely says EOS, so a long answer runs for seconds."""
    from tunedex.infra.config import FinetuneConfig
    from tunedex.workers import base_model as bm

    texts = [json.dumps({"q": f"How much does product {i} cost?", "a": f"It costs {i} dollars."}) for i in range(200)]
    tok = bm.train_tokenizer(texts, 300)
    spec = bm.model_spec(FinetuneConfig(tiny={"architecture": "llama", "n_layer": 2, "n_embd": 64, "n_head": 2},
                                        max_length=4096), tok)
    bm.build_model(spec).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return long_context_model(tmp_path_factory.mktemp("long-context-model"))


def test_engine_answers_truncates_batches_and_aborts_a_request_left_early(model_dir):
    from tunedex.serving.engine import TextEngine, check_engine_kwargs
    from tunedex.infra.generation import Sampling

    async def scenario() -> None:
        engine = TextEngine(str(model_dir), 1024, {"kv_cache_memory_bytes": 64 * 2**20})
        try:
            assert engine.context == 4096
            # on CPU the model runs in the engine core's process: no worker process beside it (cpu_executor)
            names = []
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):  # another test's process ending meanwhile
                    names.append(proc.name())
            assert "VLLM::EngineCore" in names and "VLLM::Worker" not in names, names
            question = [{"role": "user", "content": "How much does product 7 cost?"}]
            capped = await engine.generate(question, Sampling(max_new_tokens=5))
            assert 0 < capped.completion_tokens <= 5 and capped.prompt_tokens > 5
            assert capped.finish_reason == ("length" if capped.completion_tokens == 5 else "stop")
            assert len(engine.tokenizer(capped.text, add_special_tokens=False)["input_ids"]) <= 5

            # a prompt far over the context keeps its end and is answered, not refused
            huge = [{"role": "user", "content": "product cost dollars " * 3000 + "How much?"}]
            kept = await engine.generate(huge, Sampling(max_new_tokens=4))
            assert isinstance(kept.text, str) and kept.prompt_tokens + 4 <= engine.context

            answers = await asyncio.gather(*(engine.generate([{"role": "user", "content": f"Product {i}?"}],
                                                             Sampling(max_new_tokens=8)) for i in range(16)))
            assert len(answers) == 16 and all(isinstance(a.text, str) and a.completion_tokens <= 8 for a in answers)

            pieces = []
            async for piece in engine.stream(question, Sampling(max_new_tokens=1000, temperature=1.0)):
                pieces.append(piece)
                if len(pieces) == 3:
                    break  # the caller leaves after three pieces of a 1000-token answer
            for _ in range(100):
                if engine.unfinished() == 0:
                    break
                await asyncio.sleep(0.1)
            assert engine.aborted == 1 and engine.unfinished() == 0  # finished requests were not counted
        finally:
            engine.shutdown()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="max_num_batched"):
        check_engine_kwargs({"max_num_batched": 4})
    with pytest.raises(ValueError, match="promoted release"):
        check_engine_kwargs({"model": "x"})


def test_a_bfloat16_checkpoint_computes_in_bfloat16_only_on_a_cpu_with_bfloat16_arithmetic(tmp_path, monkeypatch):
    import torch

    from tunedex.serving.engine import cpu_dtype, engine_kwargs, stored_dtype

    assert cpu_dtype("bfloat16", native_bf16=True) == "bfloat16"
    assert cpu_dtype("bfloat16", native_bf16=False) == "float32"  # emulated bfloat16 is slower than float32
    assert cpu_dtype("float32", native_bf16=True) == "float32"  # never halved behind the user's back
    assert cpu_dtype("float16", native_bf16=True) == "float32"
    for config, stored in (({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "bfloat16"}, "bfloat16"), ({}, "float32")):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert stored_dtype(tmp_path) == stored
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"):  # engine_kwargs sets them; put back after
        monkeypatch.delenv(name, raising=False)
    here = "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"
    assert engine_kwargs({}, on_gpu=False, model_dir=tmp_path)["dtype"] == here
    assert engine_kwargs({"dtype": "float32"}, on_gpu=False, model_dir=tmp_path)["dtype"] == "float32"  # the config wins
    assert "dtype" not in engine_kwargs({}, on_gpu=True, model_dir=tmp_path)  # on GPUs: vLLM's own choice


def test_lora_adapters_are_served_on_one_base_engine_as_hf_merges_them(tmp_path):
    from conftest import lora_models
    from tunedex.infra.generation import Sampling, generate_batch, load_generator
    from tunedex.serving.engine import TextEngine, lora_kwargs

    base, adapters = lora_models(tmp_path, (1, 2))
    question = [{"role": "user", "content": "How much does product 7 cost?"}]
    expected = {}
    for model_dir in (base, *adapters):
        model, tok = load_generator(str(model_dir))  # evaluation's path: HF, the adapter merged in memory
        answer = generate_batch(model, tok, [question], [Sampling(max_new_tokens=8)], 8)[0]
        expected[str(model_dir)] = answer.rstrip("\ufffd")  # vLLM holds back a last incomplete UTF-8 character
    assert len(set(expected.values())) == 3  # each adapter changes the answer

    async def scenario() -> dict[str, str]:
        engine = TextEngine(str(base), 8, {"kv_cache_memory_bytes": 64 * 2**20, **lora_kwargs(adapters[0])})
        try:
            # the base and both adapters in one batch (with max_loras 2 the base's answer came out wrong)
            names = ["", *map(str, adapters)]
            answers = await asyncio.gather(*(engine.generate(question, Sampling(), name) for name in names))
            return {name or str(base): a.text.rstrip("\ufffd") for name, a in zip(names, answers)}
        finally:
            engine.shutdown()

    assert asyncio.run(scenario()) == expected


@pytest.mark.slow
def test_a_client_leaving_mid_stream_aborts_its_request_in_the_engine(pipeline, model_dir):
    cfg, path, cwd = pipeline["cfg"], str(pipeline["path"]), pipeline["cwd"]
    url = cfg.serve.url
    before = httpx.get(f"{url}/readyz", timeout=10).json()["release_id"]
    out = run_cli("promote", "--model", str(model_dir), "-c", path, "--set", "serve.max_new_tokens=1000", cwd=cwd).stdout
    release = re.search(r"promoted (rel-\S+):", out).group(1)
    try:
        with httpx.Client(timeout=60) as http:
            for _ in range(2):
                with http.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, json={
                        "stream": True, "max_tokens": 1000, "temperature": 1.0,
                        "messages": [{"role": "user", "content": "Tell me everything about product 7"}]}) as resp:
                    assert resp.status_code == 200
                    lines = resp.iter_lines()
                    assert next(lines).startswith("data: ")  # the head (sources), then the first text
                    assert next(l for l in lines if l.startswith("data: "))
                    # the client goes away ~2 pieces into a 1000-token answer
        wanted = rf'ray_tunedex_generation_aborted_total\{{[^}}]*application="{release}"[^}}]*\}} ([0-9.e+]+)'
        deadline, aborted = time.monotonic() + 60, 0
        while aborted < 2 and time.monotonic() < deadline:  # Ray exports metrics every few seconds
            text = httpx.get(f"http://127.0.0.1:{cfg.ray.metrics_export_port}/metrics", timeout=10).text
            aborted = sum(int(float(n)) for n in re.findall(wanted, text))
            time.sleep(1)
        assert aborted == 2, f"engine aborts recorded for {release}: {aborted}"
    finally:
        run_cli("promote", before, "-c", path, cwd=cwd)


def serve_applications(config: str) -> list[str]:
    """The Serve applications on the cluster, asked from a process of its own (Ray reads its token settings
    when imported: this test process imported it long ago)."""
    import subprocess
    import sys

    code = ("import sys; from tunedex.infra import services; from tunedex.infra.config import load_config; "
            "from tunedex.serving.control import applications\n"
            "with services.connect_ray(load_config(sys.argv[1])): print(*applications())")
    return subprocess.run([sys.executable, "-c", code, config], capture_output=True, text=True, check=True,
                          timeout=120).stdout.split()


@pytest.mark.slow
def test_lora_releases_on_one_base_share_its_engine_and_swap_without_a_model_load(pipeline, tmp_path):
    import threading

    from conftest import lora_models
    from tunedex.serving.control import ENGINE_PREFIX

    cfg, path, cwd = pipeline["cfg"], str(pipeline["path"]), pipeline["cwd"]
    url = cfg.serve.url
    before = httpx.get(f"{url}/readyz", timeout=10).json()["release_id"]
    _, adapters = lora_models(tmp_path, (1, 2))
    question = {"question": "How much does the Aurora Headphones 100 cost?"}

    def ask(**extra) -> dict:
        resp = httpx.post(f"{url}/v1/query", json={**question, **extra}, headers=AUTH, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def promote(*args: str) -> tuple[str, str]:
        out = run_cli("promote", *args, "-c", path, cwd=cwd).stdout
        return re.search(r"promoted (rel-\S+):", out).group(1), out

    statuses, stop = [], threading.Event()

    def load() -> None:  # a client asking all through the swaps
        while not stop.is_set():
            statuses.append(httpx.post(f"{url}/v1/query", json=question, headers=AUTH, timeout=120).status_code)

    try:
        first, out = promote("--model", str(adapters[0]))
        assert "(the endpoint now serves it)" in out and "loaded)" not in out, out  # its base loaded
        answer_1 = ask()
        assert answer_1["release_id"] == first and answer_1["sources"]
        client = threading.Thread(target=load)
        client.start()
        second, out = promote("--model", str(adapters[1]))
        assert "its model was already loaded" in out, out  # the second adapter started on the running base
        engines = [name for name in serve_applications(path) if name.startswith(ENGINE_PREFIX)]
        assert len(engines) == 1, engines  # the serving release (an adapter) and the previous one share it
        answer_2 = ask()
        base = ask(mode="rag")  # the base answers `mode: rag` on the same prompt, no second engine
        assert answer_2["release_id"] == base["release_id"] == second
        # each release generates with its own adapter (exactly as HF merges it: the engine test above)
        assert len({base["answer"], answer_1["answer"], answer_2["answer"]}) == 3
        back, out = promote(first)
        assert back == first and "it was still loaded" in out, out
        stop.set()
        client.join(timeout=300)
        assert statuses and set(statuses) == {200}, statuses
        assert ask()["release_id"] == first
    finally:
        stop.set()
        run_cli("promote", before, "-c", path, cwd=cwd)
