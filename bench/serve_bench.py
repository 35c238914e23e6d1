"""Endpoint benchmark: batching, what retrieval adds to latency, and latency during a release swap, in one run.

    python bench/serve_bench.py                      # tiny GPT-2 (2 layers); all three phases
    python bench/serve_bench.py --size small --phases overhead   # GPT-2-small shape (12 x 768, random weights)

Targets (issue 6): throughput at concurrency 16 with batching / without >= 3x; hybrid latency / generation-only
latency with the same model and prompt <= 1.10x; p50/p95/p99 under a bounded load and during a release swap.
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


def write_config(root: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    raw["data_dir"] = str(root / "data")
    raw["milvus"]["uri"] = f"http://127.0.0.1:{free_port()}"
    raw["ray"].update(address=f"127.0.0.1:{free_port()}", dashboard_port=free_port(), client_server_port=free_port(),
                      metrics_export_port=free_port())
    raw["serve"].update(port=free_port(), deployments={"Generator": {"max_ongoing_requests": 32}})
    raw["corpus"]["path"] = None
    path = root / "tunedex.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def build_model(out: Path, texts: list[str], shape: dict[str, int]) -> Path:
    from tunedex.infra.config import FinetuneConfig
    from tunedex.workers import finetune as ft

    tok = ft.train_tokenizer(texts, 2000)
    model = ft.build_model(ft.model_spec(FinetuneConfig(tiny=shape, max_length=512), tok))
    model.save_pretrained(out, safe_serialization=True)
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


def phase_batching(cfg, path: Path, model: Path, collection: str, questions: list[str], total: int,
                   wait_s: float) -> dict:
    from tunedex.serving import control

    out = {"batch_wait_timeout_s": wait_s}
    for label, size in (("batched", 16), ("unbatched", 1)):
        release = new_release(cfg, model, collection)
        control.switch(cfg, path, [f"serve.max_batch_size={size}", f"serve.batch_wait_timeout_s={wait_s}"], release)
        asyncio.run(closed_loop(cfg.serve.url, questions, 16, 16, "finetuned"))  # warm-up
        out[label] = asyncio.run(closed_loop(cfg.serve.url, questions, 16, total, "finetuned"))
        print(label, out[label], flush=True)
    out["throughput_ratio"] = round(out["batched"]["req_per_s"] / out["unbatched"]["req_per_s"], 2)
    return out


def phase_overhead(cfg, path: Path, model: Path, collection: str, questions: list[str], reps: int) -> dict:
    """Per question: Release.answer (embed + hybrid search + generate) vs Generator.generate on the very
    prompt the hybrid answer used; both through Serve handles, one at a time, greedy (same output)."""
    from ray import serve

    from tunedex.serving import control
    from tunedex.serving.generation import Sampling
    from tunedex.serving.prompt import build_messages

    release = new_release(cfg, model, collection)
    control.switch(cfg, path, [], release)
    answer = serve.get_app_handle(release.release_id).answer
    generate = serve.get_deployment_handle("Generator", app_name=release.release_id).generate
    hybrid, gen_only, retrieve, same = [], [], [], 0
    for rep in range(reps + 1):
        for q in questions:
            t = time.perf_counter()
            out = answer.remote(q, "hybrid", None, "").result()
            t_h = (time.perf_counter() - t) * 1000
            messages = build_messages(q, [s["text"] for s in out["sources"]])
            t = time.perf_counter()
            text = generate.remote(messages, Sampling()).result()
            t_g = (time.perf_counter() - t) * 1000
            if rep:  # the first pass warms up
                hybrid.append(t_h)
                gen_only.append(t_g)
                retrieve.append(out["timings_ms"]["retrieve"])
                same += text == out["answer"]
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
    parser.add_argument("--phases", default="batching,overhead,swap")
    parser.add_argument("--requests", type=int, default=160, help="requests per batching arm")
    parser.add_argument("--reps", type=int, default=3, help="passes over the questions in the overhead phase")
    parser.add_argument("--batch-wait", type=float, default=0.05, help="serve.batch_wait_timeout_s in the batching phase")
    args = parser.parse_args()
    phases = args.phases.split(",")
    results: dict = {"size": args.size, "shape": SHAPES[args.size]}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = write_config(tmp)
        cfg = load_config(path)
        demo = write_demo_data(tmp / "demo")
        services.up(cfg)
        os.environ.update(services.ray_env(cfg))
        try:
            import ray

            from tunedex.serving import control
            from tunedex.workers.embed import index_corpus

            index_corpus(cfg, demo["day1"])
            collection = registry.live_collection(cfg)
            texts = [p.read_text() for p in demo["day1"].rglob("*.md")]
            model = build_model(tmp / f"model-{args.size}", texts, SHAPES[args.size])
            questions = [json.loads(line)["question"] for line in demo["qa"].read_text().splitlines()][:20]
            ray.init(address=cfg.ray.address, logging_level="WARNING", log_to_driver=False)
            first = new_release(cfg, model, collection)
            registry.promote(cfg.registry_dir, first)
            control.start(cfg, path, [])
            if "batching" in phases:
                results["batching"] = phase_batching(cfg, path, model, collection, questions, args.requests, args.batch_wait)
            if "overhead" in phases:
                results["overhead"] = phase_overhead(cfg, path, model, collection, questions, args.reps)
                print("overhead", results["overhead"], flush=True)
            if "swap" in phases:
                results["swap"] = phase_swap(cfg, path, model, collection, questions, tmp)
                print("swap", results["swap"], flush=True)
        finally:
            services.down(cfg)
    out = REPO / "bench" / "results" / f"serve_bench_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
