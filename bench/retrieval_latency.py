"""Top-10 retrieval latency per embedded Milvus engine, with the project's own schema (infra/store.py).

    .venv/bin/python bench/retrieval_latency.py --sizes 20000,100000 --engines lite25-ivf,lite25-flat,lite3

Engines: `lite3` is the Milvus Lite 3.x server (`milvus-lite server`, pure Python, from .venv);
`lite25-flat` / `lite25-ivf` are the C++ milvus-lite 2.5 server (from .venv-milvus, made by
`make install`) with a FLAT or IVF_FLAT dense index. Each engine gets its own server and data dir;
one collection grows through the sizes. Rows are synthetic: random unit 384-d vectors and texts of
Zipf-drawn words (BM25 needs words); vectors lie around 2,000 random topics, so neighbours exist
as they do for real embeddings (see topic_vectors). Collections are filled with plain insert (fresh ids)
and the project's write path (upsert + flush of `milvus.write_batch_size` rows replacing existing ones)
is timed apart. Queries are stored vectors plus noise (recall@10 is measured
against exact cosine search over all rows, computed here with numpy) and 3-word BM25 queries.
Prints dense / BM25 / hybrid (RRF) p50 and p95 in ms, recall@10, insert rows/s and the time from an
acknowledged upsert+flush to the row being found by search; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tunedex.infra import services, store
from tunedex.infra.config import MilvusConfig

DIM = 384
ENGINES = {  # name -> (local engine, index_type)
    "lite3": ("milvus-lite-3", "FLAT"),
    "lite25-flat": ("milvus-lite-2.5", "FLAT"),
    "lite25-ivf": ("milvus-lite-2.5", "IVF_FLAT"),
}


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def topic_vectors(rng: np.random.Generator, n: int, topics: np.ndarray) -> np.ndarray:
    """Unit vectors around random topics: like real embeddings, they have near neighbours (uniform random
    vectors in 384-d are all about equally far apart, and no index could find a meaningful top-10)."""
    v = topics[rng.integers(len(topics), size=n)] + 0.6 * unit_vectors(rng, n)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def texts(rng: np.random.Generator, n: int, vocab: list[str], words: int = 60) -> list[str]:
    p = 1.0 / np.arange(1, len(vocab) + 1)
    idx = rng.choice(len(vocab), size=(n, words), p=p / p.sum())
    return [" ".join(vocab[i] for i in row) for row in idx]


def rows_for(start: int, vecs: np.ndarray, txts: list[str]) -> list[dict]:
    return [
        {"chunk_id": f"c{start + i}", "doc_id": f"d{(start + i) // 8}", "doc_version": "v1", "doc_chunks": 8,
         "chunk_index": (start + i) % 8, "text": t, "metadata": {}, "dense": v.tolist()}
        for i, (v, t) in enumerate(zip(vecs, txts))
    ]


def hit_id(hit) -> str:
    return hit["id"] if "id" in hit else hit["chunk_id"]


def timed(fn, n: int) -> tuple[list[float], list]:
    ms, out = [], []
    for i in range(n):
        t0 = time.perf_counter()
        out.append(fn(i))
        ms.append((time.perf_counter() - t0) * 1000)
    return ms, out


def p50_p95(ms: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ms, n=20)
    return statistics.median(ms), q[18]


def measure(client, cfg: MilvusConfig, name: str, all_vecs: np.ndarray, vocab: list[str], rng, queries: int,
            nprobes: list[int]) -> dict:
    qv = all_vecs[rng.choice(len(all_vecs), queries)] + 0.3 * unit_vectors(rng, queries)
    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    exact = np.argsort(-(qv @ all_vecs.T), axis=1)[:, :10]
    qt = [" ".join(rng.choice(vocab[:2000], 3)) for _ in range(queries)]

    def dense(i, params):
        res = client.search(name, [qv[i].tolist()], anns_field="dense", limit=10, search_params={"params": params},
                            consistency_level=cfg.consistency_level)
        return [int(hit_id(h)[1:]) for h in res[0]]

    out: dict = {}
    for nprobe in nprobes or [None]:
        params = {"nprobe": nprobe} if nprobe else {}
        dense(0, params)  # warm: the first search loads what the engine loads lazily
        ms, ids = timed(lambda i: dense(i, params), queries)
        recall = float(np.mean([len(set(got) & set(want)) / 10 for got, want in zip(ids, exact)]))
        out[f"dense nprobe={nprobe}" if nprobe else "dense"] = {"p50_p95": p50_p95(ms), "recall@10": recall}
    if nprobes:
        ok = [n for n in nprobes if out[f"dense nprobe={n}"]["recall@10"] >= 0.95]
        chosen = min(ok) if ok else max(nprobes)
        out["nprobe"] = chosen
        cfg = cfg.model_copy(update={"search_params": {"nprobe": chosen}})
    bm25 = lambda i: client.search(name, [qt[i]], anns_field="sparse", limit=10, search_params={"params": {}},
                                   consistency_level=cfg.consistency_level)
    bm25(0)
    out["bm25"] = {"p50_p95": p50_p95(timed(bm25, queries)[0])}
    hybrid = lambda i: store.hybrid_search(client, cfg, name, qv[i].tolist(), qt[i], 10)
    hybrid(0)
    out["hybrid"] = {"p50_p95": p50_p95(timed(hybrid, queries)[0])}
    out["searchable_after_write_ms"] = time_to_searchable(client, cfg, name, rng, vocab)
    return out


def time_to_searchable(client, cfg: MilvusConfig, name: str, rng, vocab: list[str]) -> float:
    """From the start of upsert+flush of one new row to a dense search that finds it."""
    vec = unit_vectors(rng, 1)  # far from every topic: found first only once written
    row = rows_for(10**9 + int(rng.integers(10**6)), vec, texts(rng, 1, vocab))[0]
    t0 = time.perf_counter()
    store.upsert_rows(client, name, [row])
    while True:
        res = client.search(name, [vec[0].tolist()], anns_field="dense", limit=1,
                            search_params={"params": cfg.dense_search_params}, consistency_level="Strong")
        if res[0] and hit_id(res[0][0]) == row["chunk_id"]:
            break
        if time.perf_counter() - t0 > 120:
            return float("inf")
        time.sleep(0.01)
    ms = (time.perf_counter() - t0) * 1000
    client.delete(name, ids=[row["chunk_id"]])
    client.flush(name)
    return ms


def run_engine(engine: str, sizes: list[int], args, root: Path) -> list[dict]:
    local_engine, index_type = ENGINES[engine]
    nlist = args.nlist
    cfg = MilvusConfig(uri=f"http://127.0.0.1:{services.free_port()}", index_type=index_type,
                       index_params={"nlist": nlist} if index_type == "IVF_FLAT" else {}, search_params={},
                       local_engine=local_engine)
    data = root / engine
    proc = services.launch_milvus(cfg, data, root / f"{engine}.log")
    try:
        services.wait_listening(cfg, proc, root / f"{engine}.log", timeout=60)
        client = store.connect(cfg, timeout=600)
        name = "bench__" + engine.replace("-", "_")
        store.ensure_collection(client, cfg, name, DIM)
        rng = np.random.default_rng(0)
        vocab = [f"w{i}" for i in range(20_000)]
        topics = unit_vectors(rng, 2000)
        vecs = np.zeros((0, DIM), np.float32)
        results = []
        for size in sizes:
            # bulk fill with plain insert (fresh ids: the same rows an upsert would give, much faster to build)
            t0 = time.perf_counter()
            parts = [vecs]
            for start in range(len(vecs), size, args.batch):
                n = min(args.batch, size - start)
                parts.append(topic_vectors(rng, n, topics))
                client.insert(name, rows_for(start, parts[-1], texts(rng, n, vocab)))
            vecs = np.concatenate(parts)
            client.flush(name)
            added = len(vecs) - (results[-1]["rows"] if results else 0)
            insert_rate = added / (time.perf_counter() - t0)
            if index_type == "IVF_FLAT":  # build the index on what was written, as a collection at rest has
                client.release_collection(name)
                client.load_collection(name)
            # the project's write path: upsert + flush of one batch (store.write_batch_size) that replaces rows
            t0 = time.perf_counter()
            again = rng.choice(len(vecs), cfg.write_batch_size, replace=False)
            store.upsert_rows(client, name, [dict(r, chunk_id=f"c{i}") for i, r in
                                             zip(again, rows_for(0, vecs[again], texts(rng, len(again), vocab)))])
            upsert_rate = len(again) / (time.perf_counter() - t0)
            res = {"engine": engine, "rows": size, "insert_rows_per_s": insert_rate, "upsert_rows_per_s": upsert_rate,
                   **measure(client, cfg, name, vecs, vocab, rng, args.queries,
                             args.nprobes if index_type == "IVF_FLAT" else [])}
            results.append(res)
            print(summary(res), flush=True)
        return results
    finally:
        proc.terminate()
        proc.wait(30)


def summary(r: dict) -> str:
    dense_key = f"dense nprobe={r['nprobe']}" if "nprobe" in r else "dense"
    d, b, h = r[dense_key]["p50_p95"], r["bm25"]["p50_p95"], r["hybrid"]["p50_p95"]
    sweep = " ".join(f"{k.split('=')[1]}:{v['recall@10']:.3f}/{v['p50_p95'][0]:.0f}ms"
                     for k, v in r.items() if k.startswith("dense nprobe="))
    return (f"{r['engine']:12s} rows {r['rows']:>8d}  dense {d[0]:7.1f}/{d[1]:7.1f}  bm25 {b[0]:7.1f}/{b[1]:7.1f}  "
            f"hybrid {h[0]:7.1f}/{h[1]:7.1f} ms p50/p95  recall@10 {r[dense_key]['recall@10']:.3f}  "
            f"insert {r['insert_rows_per_s']:.0f} rows/s  upsert+flush {r['upsert_rows_per_s']:.0f} rows/s  searchable after write {r['searchable_after_write_ms']:.0f} ms"
            + (f"  nprobe sweep (recall/p50) {sweep}" if sweep else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,100000", help="row counts, ascending; e.g. 20000,100000,1000000")
    ap.add_argument("--engines", default="lite25-ivf,lite25-flat,lite3", help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1000, help="rows per insert when filling (5000 ran 15x slower on milvus-lite 2.5)")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobes", default="16,32,64,128", help="IVF_FLAT nprobe values tried; the smallest with recall@10 >= 0.95 is used")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    args.nprobes = [int(n) for n in args.nprobes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="tunedex-retrieval-"))
    results = []
    try:
        for engine in engines:
            results += run_engine(engine, sizes, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(__file__).parent / "results" / f"retrieval_latency_{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
