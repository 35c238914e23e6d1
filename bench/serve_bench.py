"""Endpoint benchmark: the engine, what Serve + HTTP + retrieval add, and latency during a release swap, in one run.

    python bench/serve_bench.py --size small                    # GPT-2-small shape (12 x 768, random weights)
    python bench/serve_bench.py --phases engine,endpoint,ttft   # tiny GPT-2 (2 layers)
    python bench/serve_bench.py --size small --arch llama       # a Llama of the same shape

Targets (issue 15): requests/s at concurrency 16, generation only: vLLM (`TextEngine`) / Hugging Face `generate`
on the same 16 prompts in one left-padded batch (the best case of the former `@serve.batch` engine) >= 3x,
beside the most any engine could reach here (`matmul_floor`: the weight matmuls alone on vLLM's GEMM, ÷ HF);
our endpoint (`/v1/query`, mode finetuned) / `vllm.LLM.generate` in-process on the same prompts >= 0.8;
time to first token p50 at concurrency 1 and 16; hybrid latency / generation-only latency with the same model
and prompt <= 1.10x; p50/p95/p99 under a bounded load and during a release swap.
It starts its own Milvus Lite server and Ray head on free ports with a temporary data dir, indexes the demo
catalog, and builds a random-weight model of the chosen shape (there is no model hub here). Load is on
localhost only and bounded in count. Writes bench/results/serve_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from tunedex.demo_data import write_demo_data
from tunedex.infra import registry, services
from tunedex.infra.config import load_config
from tunedex.infra.services import free_port

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4}, "small": {"n_layer": 12, "n_embd": 768, "n_head": 12}}


def write_config(root: Path, new_tokens: int, configured: dict) -> Path:
    raw = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    raw["data_dir"] = str(root / "data")
    raw["milvus"]["uri"] = f"http://127.0.0.1:{free_port()}"
    raw["ray"].update(address=f"127.0.0.1:{free_port()}", dashboard_port=free_port(), client_server_port=free_port(),
                      metrics_export_port=free_port())
    raw["serve"].update(port=free_port(), max_new_tokens=new_tokens, deployments={"Generator": {"max_ongoing_requests": 32}})
    raw["serve"]["engine_kwargs"] = configured
    raw["corpus"]["path"] = None
    path = root / "tunedex.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def build_model(out: Path, texts: list[str], shape: dict[str, int], dtype: str = "float32") -> Path:
    import torch

    from tunedex.infra.config import FinetuneConfig
    from tunedex.workers import base_model as bm

    tok = bm.train_tokenizer(texts, 2000)
    model = bm.build_model(bm.model_spec(FinetuneConfig(tiny=shape, max_length=512), tok))
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"n": len(xs), "p50_ms": round(pick(0.50), 1), "p95_ms": round(pick(0.95), 1), "p99_ms": round(pick(0.99), 1)}


async def closed_loop(url: str, questions: list[str], clients: int, total: int, mode: str) -> dict:
    """`clients` concurrent clients send `total` requests between them; throughput and latency."""
    latencies, statuses = [], []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(questions[i % len(questions)])

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            q = queue.get_nowait()
            t = time.perf_counter()
            resp = await http.post(f"{url}/v1/query", json={"question": q, "mode": mode})
            latencies.append((time.perf_counter() - t) * 1000)
            statuses.append(resp.status_code)

    async with httpx.AsyncClient(timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {"requests": total, "seconds": round(seconds, 2), "req_per_s": round(total / seconds, 2),
            "non_200": sum(s != 200 for s in statuses), **percentiles(latencies)}


def new_release(cfg, model: Path, collection: str) -> registry.Release:
    release = registry.new_release(model, collection, cfg.embedding.model)
    registry.save_release(cfg.registry_dir, release)
    time.sleep(1.1)  # release ids carry the second they were made
    return release


def rendered_prompts(model: Path, questions: list[str]) -> list[list[int]]:
    """The token ids `/v1/query` (mode finetuned) generates from: the question in the chat template."""
    from transformers import AutoTokenizer

    from tunedex.infra.generation import render
    from tunedex.infra.prompt import build_messages

    tok = AutoTokenizer.from_pretrained(model)
    return [tok(render(tok, build_messages(q, [])), add_special_tokens=False)["input_ids"] for q in questions]


def hf_batch(model: Path, prompts: list[list[int]], new_tokens: int, reps: int, dtype: str) -> float:
    """Requests/s of Hugging Face `generate` on all prompts in one left-padded batch, `new_tokens` each."""
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        lm.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        started = time.perf_counter()
        for _ in range(reps):
            lm.generate(**kwargs)
    return len(prompts) * reps / (time.perf_counter() - started)


def matmul_floor(model: Path, prompts: list[list[int]], new_tokens: int, dtype: str, steps: int = 20) -> float:
    """Requests/s no engine reaches with this machine's fastest GEMM (oneDNN on weights packed once, as
    vLLM's CPU build calls it): the prefill (every weight matrix times all prompt tokens at once, the output
    layer times one per prompt) and `new_tokens - 1` decode steps (every weight times one row per prompt), each
    the best of its tries. Attention, norms, activations and sampling are left out, so the bound is generous."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from vllm import _custom_ops as ops

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    head = lm.get_output_embeddings().weight
    weights = {m.weight.data_ptr(): m.weight.detach().T.contiguous() if isinstance(m, Conv1D) else m.weight.detach()
               for m in lm.modules() if isinstance(m, (torch.nn.Linear, Conv1D))}  # (out, in) as in vLLM; tied: once
    gemms = {ptr: (w.shape[1], ops.create_onednn_mm(w.t(), 32)) for ptr, w in weights.items()}

    def best(rows: int, head_rows: int, tries: int) -> float:
        calls = [(torch.randn(head_rows if ptr == head.data_ptr() else rows, k, dtype=head.dtype), gemm)
                 for ptr, (k, gemm) in gemms.items()]
        fastest = float("inf")
        for _ in range(tries):
            started = time.perf_counter()
            for x, gemm in calls:
                ops.onednn_mm(gemm, x, None)
            fastest = min(fastest, time.perf_counter() - started)
        return fastest

    n = len(prompts)
    prefill = best(sum(map(len, prompts)), n, 3)
    decode = best(n, n, steps)
    return n / (prefill + (new_tokens - 1) * decode)


def vllm_concurrent(model: Path, prompts: list[list[int]], new_tokens: int, reps: int) -> tuple[float, str]:
    """Requests/s of our engine (`TextEngine`'s vLLM engine, its defaults) with all prompts in flight at once,
    and the dtype it computed in."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tunedex.serving.engine import TextEngine

    async def run() -> tuple[float, str]:
        engine = TextEngine(str(model), new_tokens, {})
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0)

        async def one(ids: list[int], i: int) -> None:
            async for _ in engine.engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"r{i}"):
                pass

        await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts)))  # warm-up
        started = time.perf_counter()
        for rep in range(reps):
            await asyncio.gather(*(one(p, (rep + 1) * 1000 + i) for i, p in enumerate(prompts)))
        rate = len(prompts) * reps / (time.perf_counter() - started)
        engine.shutdown()
        return rate, str(engine.engine.model_config.dtype).removeprefix("torch.")

    return asyncio.run(run())


def vllm_offline(model: Path, prompts: list[list[int]], new_tokens: int, reps: int, configured: dict) -> dict:
    """`vllm.LLM.generate` in-process on the prompts, greedy, stopping where the model stops (as the endpoint)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tunedex.serving.engine import engine_kwargs

    llm = LLM(model=str(model), **engine_kwargs(configured, on_gpu=False, model_dir=model))  # as TextEngine
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs, params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    for _ in range(reps):
        outs = llm.generate(inputs, params, use_tqdm=False)
    rate = len(prompts) * reps / (time.perf_counter() - started)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs) / len(outs)
    del llm
    return {"req_per_s": round(rate, 2), "mean_new_tokens": round(tokens, 1)}


def phase_engine(model: Path, questions: list[str], new_tokens: int, reps: int, dtype: str) -> dict:
    prompts = rendered_prompts(model, questions[:16])
    hf = hf_batch(model, prompts, new_tokens, reps, dtype)
    vllm, vllm_dtype = vllm_concurrent(model, prompts, new_tokens, reps)
    floor = matmul_floor(model, prompts, new_tokens, vllm_dtype)  # in what vLLM computed
    return {"prompts": len(prompts), "new_tokens": new_tokens, "stored_dtype": dtype, "vllm_dtype": vllm_dtype,
            "hf_batch_req_per_s": round(hf, 2),
            "vllm_req_per_s": round(vllm, 2), "throughput_ratio": round(vllm / hf, 2),
            "matmul_floor_req_per_s": round(floor, 2), "floor_ratio": round(floor / hf, 2)}


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process on the machine, by pid, with what it is (Ray sets
    process titles: `ray::ServeReplica:APP:DEPLOYMENT`, `VLLM::EngineCore`, `raylet`, ...; an actor's title also
    names the method it runs, so titles change while it works)."""
    import psutil

    found: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times, cmd = proc.info["cpu_times"], proc.info["cmdline"] or [proc.info["name"] or "?"]
        if times is None:
            continue
        title = cmd[0].split(" ")[0] if cmd[0].startswith(("ray::", "VLLM::")) else Path(cmd[0]).name
        if title.startswith("ray::ServeReplica:"):  # ray::ServeReplica:APP:DEPLOYMENT, APP a release id or hash
            title = "ray::ServeReplica:" + title.rsplit(":", 1)[-1]
        elif title.startswith("ray::"):  # ray::ServeController.listen_for_change -> ray::ServeController
            title = title.split(".")[0]
        elif title.startswith("python") and len(cmd) > 1:
            title = " ".join(Path(a).name for a in cmd[1:3])
        found[proc.pid] = (title, times.user + times.system)
    return found


def cpu_share(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float) -> dict[str, float]:
    """Percent of one core each kind of process used between two `cpu_seconds` snapshots (200 = 2 cores); a
    process is matched by pid, so one whose title changed in between is still counted from its snapshot."""
    used: dict[str, float] = {}
    for pid, (title, total) in after.items():
        used[title] = used.get(title, 0.0) + (total - before.get(pid, (title, 0.0))[1]) / seconds * 100
    return {k: round(v, 1) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def phase_endpoint(cfg, questions: list[str], offline: dict, reps: int) -> dict:
    """16 clients, generation only, ÷ the same prompts through `vllm.LLM.generate` in-process (measured before
    the stack started, so both had the machine to themselves). Also where the CPU went during the load, and
    what the idle stack uses."""
    asyncio.run(closed_loop(cfg.serve.url, questions[:16], 16, 16, "finetuned"))  # warm-up
    before, started = cpu_seconds(), time.perf_counter()
    ours = asyncio.run(closed_loop(cfg.serve.url, questions[:16], 16, 16 * reps, "finetuned"))
    loaded = cpu_share(before, cpu_seconds(), time.perf_counter() - started)
    before, started = cpu_seconds(), time.perf_counter()
    time.sleep(10)
    idle = cpu_share(before, cpu_seconds(), time.perf_counter() - started)
    return {"endpoint": ours, "offline": offline, "ratio": round(ours["req_per_s"] / offline["req_per_s"], 2),
            "cpu_percent_loaded": loaded, "cpu_percent_idle": idle}


async def first_tokens(url: str, questions: list[str], clients: int, total: int) -> list[float]:
    """Milliseconds from sending a streamed chat request to its first generated text."""
    out: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(questions[i % len(questions)])

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = {"stream": True, "messages": [{"role": "user", "content": queue.get_nowait()}]}
            t = time.perf_counter()
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        out.append((time.perf_counter() - t) * 1000)
                        break

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return out


def phase_ttft(cfg, questions: list[str]) -> dict:
    asyncio.run(first_tokens(cfg.serve.url, questions, 4, 8))  # warm-up
    return {f"concurrency_{c}": percentiles(asyncio.run(first_tokens(cfg.serve.url, questions, c, 4 * c)))
            for c in (1, 16)}


def phase_overhead(cfg, path: Path, model: Path, collection: str, questions: list[str], reps: int) -> dict:
    """Per question: Release.answer (embed + hybrid search + generate) vs Generator.generate on the very
    prompt the hybrid answer used; both through Serve handles, one at a time, greedy (same output)."""
    from ray import serve

    from tunedex.serving import control
    from tunedex.infra.generation import Sampling
    from tunedex.infra.prompt import build_messages

    release = new_release(cfg, model, collection)
    control.switch(cfg, path, [], release)
    handle = serve.get_app_handle(release.release_id)
    [engine] = handle.engine_apps.remote().result()  # the release's model runs in an engine application of its own
    answer, generate = handle.answer, serve.get_deployment_handle("Generator", app_name=engine).generate
    hybrid, gen_only, retrieve, same = [], [], [], 0
    for rep in range(reps + 1):
        for q in questions:
            t = time.perf_counter()
            out = answer.remote(q, "hybrid", None, "").result()
            t_h = (time.perf_counter() - t) * 1000
            messages = build_messages(q, [s["text"] for s in out.sources])
            t = time.perf_counter()
            text = generate.remote(messages, Sampling()).result().text
            t_g = (time.perf_counter() - t) * 1000
            if rep:  # the first pass warms up
                hybrid.append(t_h)
                gen_only.append(t_g)
                retrieve.append(out.timings_ms["retrieve"])
                same += text == out.answer
    return {"pairs": len(hybrid), "same_answer": same, "hybrid": percentiles(hybrid), "generation_only": percentiles(gen_only),
            "retrieve_ms_p50": round(statistics.median(retrieve), 1),
            "latency_ratio_p50": round(statistics.median(hybrid) / statistics.median(gen_only), 3),
            "latency_ratio_mean": round(statistics.fmean(hybrid) / statistics.fmean(gen_only), 3)}


def phase_swap(cfg, path: Path, model: Path, collection: str, questions: list[str], tmp: Path) -> dict:
    """8 clients in a closed loop; steady-state percentiles, then those of the requests in flight while a
    new release (a copy of the model: a cold load) is deployed beside and switched to."""
    from tunedex.serving import control

    base = new_release(cfg, model, collection)
    control.switch(cfg, path, [], base)
    steady = asyncio.run(closed_loop(cfg.serve.url, questions, 8, 200, "hybrid"))
    copy = tmp / "model-copy"
    shutil.copytree(model, copy)
    target = new_release(cfg, copy, collection)
    records: list[tuple[float, float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            i = 0
            while not stop.is_set():
                t = time.perf_counter()
                resp = http.post(f"{cfg.serve.url}/v1/query", json={"question": questions[i % len(questions)]})
                records.append((t, time.perf_counter(), resp.status_code, resp.json().get("release_id", "")))
                i += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(3)
    swap_start = time.perf_counter()
    control.switch(cfg, path, [], target)
    swap_end = time.perf_counter()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    during = [(e - s) * 1000 for s, e, _, _ in records if e >= swap_start and s <= swap_end]
    return {"steady": steady, "swap_seconds": round(swap_end - swap_start, 1), "during_swap": percentiles(during),
            "requests_total": len(records), "non_200": sum(r[2] != 200 for r in records),
            "releases_seen": sorted({r[3] for r in records}), "expected": sorted({base.release_id, target.release_id})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2", help="the random-weight model's architecture")
    parser.add_argument("--phases", default="engine,endpoint,ttft,overhead,swap")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per answer (serve.max_new_tokens)")
    parser.add_argument("--reps", type=int, default=3, help="passes over the prompts per measured arm")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the random model's stored dtype: HF loads it as stored (as it did), vLLM as tunedex "
                             "serves it (bfloat16 on a CPU with AVX512-BF16, otherwise float32)")
    parser.add_argument("--engine-kwargs", type=json.loads, default={},
                        help='serve.engine_kwargs (JSON) for the endpoint and its in-process arm, e.g. \'{"max_num_seqs": 8}\'')
    args = parser.parse_args()
    phases = args.phases.split(",")
    shape = {**SHAPES[args.size], "architecture": args.arch}
    results: dict = {"size": args.size, "shape": shape}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = write_config(tmp, args.new_tokens, args.engine_kwargs)
        cfg = load_config(path)
        os.environ.update(services.ray_env(cfg))  # before anything imports ray (vLLM does)
        demo = write_demo_data(tmp / "demo")
        texts = [p.read_text() for p in demo["day1"].rglob("*.md")]
        model = build_model(tmp / f"model-{args.size}", texts, shape, args.dtype)
        questions = [json.loads(line)["question"] for line in demo["qa"].read_text().splitlines()][:20]
        if "engine" in phases:  # in-process, before the stack starts
            results["engine"] = phase_engine(model, questions, args.new_tokens, args.reps, args.dtype)
            print("engine", results["engine"], flush=True)
        if "endpoint" in phases:
            offline = vllm_offline(model, rendered_prompts(model, questions[:16]), args.new_tokens, args.reps,
                                   args.engine_kwargs)
        services.up(cfg)
        try:
            from tunedex.serving import control
            from tunedex.workers.embed import index_corpus

            index_corpus(cfg, demo["day1"])
            collection = registry.live_collection(cfg)
            with services.connect_ray(cfg):
                first = new_release(cfg, model, collection)
                registry.promote(cfg.registry_dir, first)
                control.start(cfg, path, [])
                if "endpoint" in phases:
                    results["endpoint"] = phase_endpoint(cfg, questions, offline, args.reps)
                    print("endpoint", results["endpoint"], flush=True)
                if "ttft" in phases:
                    results["ttft"] = phase_ttft(cfg, questions)
                    print("ttft", results["ttft"], flush=True)
                if "overhead" in phases:
                    results["overhead"] = phase_overhead(cfg, path, model, collection, questions, args.reps)
                    print("overhead", results["overhead"], flush=True)
                if "swap" in phases:
                    results["swap"] = phase_swap(cfg, path, model, collection, questions, tmp)
                    print("swap", results["swap"], flush=True)
        finally:
            services.down(cfg)
    out = REPO / "bench" / "results" / f"serve_bench_{args.size}_{args.arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
