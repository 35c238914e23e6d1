"""The ledger read at scale: memory and time of planning a `tunedex index` run over a large collection.

    .venv/bin/python bench/ledger_scale.py --rows 1000000     # builds the collection once (cached), then measures
    .venv/bin/python bench/ledger_scale.py --rows 1000000 --skip-old --pages 5000,16384   # and the read per page size

It starts the milvus-lite 2.5.1 server (from .venv-milvus, `make install`) on a free port over a cached data dir
(bench/results/ledger_scale_<rows>/, ignored by git) and fills it, on the first run, with synthetic ledger rows
through the project's schema (`store.ensure_collection`): `--chunks-per-doc` chunks per document, real
32-hex chunk ids and doc versions, short texts and 8-d vectors (the ledger read never reads text or vectors).
Then, for the same corpus (Document objects built before any measurement):

- old: `read_ledger`'s dict chunk_id -> (doc_id, doc_version, doc_chunks), plus the per-doc copy the old
  `plan_sync` built from it (kept here, a few lines, to compare);
- new, no-op: `store.read_doc_states` + `docs_to_read` + `plan_sync` (nothing changed: no chunk ids read);
- new, 1% of docs changed and 0.1% removed: the same plus `store.read_doc_chunks` for those docs.

Each is run once for time and once under tracemalloc for its peak Python memory (tracemalloc slows
allocation, so the two are apart). A full index is estimated from the embedding throughput measured here
on a sample of chunk-sized texts (embedding alone: a real full index also writes, so the ratio printed is an
upper bound). Prints the figures; writes JSON to bench/results/ledger_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tunedex.infra import services, store
from tunedex.infra.config import EmbeddingConfig, MilvusConfig
from tunedex.infra.ids import chunk_id, content_hash
from tunedex.workers.embed import docs_to_read, plan_sync
from tunedex.workers.sources import Document

MODEL = "all-MiniLM-L6-v2"
NAME = "ledger__bench"
DIM = 8
WORDS = ("kettle lamp chair desk cable warranty refund shipping battery screen speaker mouse keyboard stock "
         "price order invoice repair replace delivery return colour size model series fabric steel oak").split()


def doc_id(i: int) -> str:
    return f"catalog/part{i % 100:02d}/doc{i:07d}.md"


def chunk_texts(i: int, per_doc: int, edit: str = "") -> list[str]:
    return [f"chunk {j} of doc {i}{edit if j == 0 else ''}" for j in range(per_doc)]


def ledger_rows(start: int, stop: int, per_doc: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    vecs = rng.standard_normal((stop - start, DIM)).astype(np.float32)
    rows = []
    for k, n in enumerate(range(start, stop)):
        i, j = divmod(n, per_doc)
        text = f"chunk {j} of doc {i}"  # chunk_texts(i, per_doc)[j]
        rows.append({"chunk_id": chunk_id(doc_id(i), 0, text, MODEL), "doc_id": doc_id(i),
                     "doc_version": content_hash(f"v1 {i}"), "doc_chunks": per_doc, "chunk_index": j,
                     "text": text, "metadata": {}, "dense": vecs[k].tolist()})
    return rows


def fill(client, cfg: MilvusConfig, rows: int, per_doc: int, batch: int) -> float:
    """Insert rows [count, rows) with fresh ids (plain insert: a bench fill, not the project's write path)."""
    store.ensure_collection(client, cfg, NAME, DIM)
    have = store.count_rows(client, NAME)
    rng = np.random.default_rng(have)
    started = time.perf_counter()
    for start in range(have, rows, batch):
        client.insert(NAME, ledger_rows(start, min(rows, start + batch), per_doc, rng))
        if (start // batch) % 50 == 0:
            print(f"  filled {start:,}/{rows:,} rows ({time.perf_counter() - started:.0f}s)", flush=True)
    client.flush(NAME)
    return time.perf_counter() - started


def corpus(docs: int, per_doc: int, changed: float, removed: float, rng: random.Random) -> list[Document]:
    """The corpus as the indexer would load it: all docs unchanged but `changed` of them edited in one chunk
    and `removed` of them gone. Unchanged docs carry no text: the planner never chunks them."""
    ids = list(range(docs))
    gone = set(rng.sample(ids, int(docs * removed)))
    edited = set(rng.sample([i for i in ids if i not in gone], int(docs * changed)))
    out = []
    for i in ids:
        if i in edited:
            text = "|".join(chunk_texts(i, per_doc, edit=" (edited)"))
            out.append(Document(doc_id(i), content_hash(text), text))
        elif i not in gone:
            out.append(Document(doc_id(i), content_hash(f"v1 {i}"), ""))
    return out


def splitter(text: str) -> list[str]:
    return text.split("|")


def old_ledger(client) -> tuple[int, int]:
    """What a run held before: read_ledger's dict, and the per-doc copy plan_sync built from it (both at once)."""
    ledger = {r["chunk_id"]: (r["doc_id"], r["doc_version"], int(r["doc_chunks"]))
              for r in store.iter_rows(client, NAME, store.LEDGER_FIELDS)}
    stored_by_doc: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    for cid, (d, version, n) in ledger.items():
        stored_by_doc[d][cid] = (version, n)
    return len(ledger), len(stored_by_doc)


def new_plan(client, docs: list[Document]) -> tuple[int, int]:
    """What a run holds now: per-doc states, and chunk ids only of the docs the plan needs."""
    states = store.read_doc_states(client, NAME)
    needed = docs_to_read(docs, states, set())
    stored = store.read_doc_chunks(client, NAME, states, needed) if needed else {}
    plan = plan_sync(docs, states, set(), splitter, MODEL, stored)
    assert plan.docs_unchanged == len(docs) - plan.docs_changed, "the bench corpus should only be unchanged or edited"
    return len(states), len(needed)


def measured(fn: Callable[[], Any]) -> dict[str, Any]:
    """Wall time of one run, then peak and retained Python memory (MB) of a second run under tracemalloc."""
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": round(seconds, 2), "peak_mb": round(peak / 2**20, 1), "result": out}


def read_by_page(client, pages: list[int], reps: int) -> dict[int, list[float]]:
    """Seconds of `store.read_doc_states` with each query_iterator page size, arms alternating."""
    rows = store.count_rows(client, NAME)
    times: dict[int, list[float]] = {p: [] for p in pages}
    for _ in range(reps):
        for page in pages:
            t0 = time.perf_counter()
            states = store.read_doc_states(client, NAME, page)
            times[page].append(round(time.perf_counter() - t0, 2))
            assert sum(s.rows for s in states.values()) == rows
    return times


def embed_rate(sample: int) -> float:
    """Chunks/s of the project's embedder (`embedding.backend: openvino`, the default) on chunk-sized texts."""
    from tunedex.infra.embedding import load_embedder

    embedder = load_embedder(EmbeddingConfig(model=MODEL))
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(150)) for _ in range(sample)]  # ~160 tokens, chunk_size 200
    embedder.embed(texts[:16])  # warm
    t0 = time.perf_counter()
    embedder.embed(texts)
    return sample / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunks-per-doc", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1000, help="rows per insert when filling")
    ap.add_argument("--sample", type=int, default=256, help="chunks embedded to measure throughput")
    ap.add_argument("--skip-old", action="store_true", help="measure the new read only")
    ap.add_argument("--pages", default="", help="also time the read per query_iterator page size, e.g. 5000,16384")
    args = ap.parse_args()
    results = Path(__file__).parent / "results"
    data = results / f"ledger_scale_{args.rows}_{args.chunks_per_doc}"
    cfg = MilvusConfig(uri=f"http://127.0.0.1:{services.free_port()}", local_engine="milvus-lite-2.5",
                       index_type="FLAT", index_params={}, search_params={})
    data.mkdir(parents=True, exist_ok=True)
    proc = services.launch_milvus(cfg, data / "milvus", data / "milvus.log")
    try:
        services.wait_listening(cfg, proc, data / "milvus.log", timeout=120)
        client = store.connect(cfg, timeout=600)
        fill_s = fill(client, cfg, args.rows, args.chunks_per_doc, args.batch)
        client.load_collection(NAME)
        docs_n = args.rows // args.chunks_per_doc
        noop_docs = corpus(docs_n, args.chunks_per_doc, 0.0, 0.0, random.Random(0))
        mix_docs = corpus(docs_n, args.chunks_per_doc, 0.01, 0.001, random.Random(0))
        out = {"rows": store.count_rows(client, NAME), "docs": docs_n, "chunks_per_doc": args.chunks_per_doc,
               "fill_s": round(fill_s, 1), "cpus": os.cpu_count(), "load_avg_before": os.getloadavg()[0]}
        out["new_noop"] = measured(lambda: new_plan(client, noop_docs))
        print(f"new, no-op: {out['new_noop']}", flush=True)
        out["new_1pct_changed"] = measured(lambda: new_plan(client, mix_docs))
        print(f"new, 1% changed 0.1% removed: {out['new_1pct_changed']}", flush=True)
        if args.pages:
            out["read_s_by_page"] = read_by_page(client, [int(p) for p in args.pages.split(",")], reps=2)
            print(f"read by page size: {out['read_s_by_page']}", flush=True)
        if not args.skip_old:
            out["old"] = measured(lambda: old_ledger(client))
            print(f"old: {out['old']}", flush=True)
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)
    rate = embed_rate(args.sample)
    full_s = out["rows"] / rate
    out.update(embed_chunks_per_s=round(rate, 1), full_index_estimate_s=round(full_s), load_avg_after=os.getloadavg()[0])
    for key in ("new_noop", "new_1pct_changed", "old"):
        if key in out:
            out[key]["over_full_index"] = round(out[key]["seconds"] / full_s, 5)
    (results / "ledger_scale.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    print(f"{out['rows']:,} rows, {docs_n:,} docs: no-op plan {out['new_noop']['peak_mb']} MB peak, "
          f"{out['new_noop']['seconds']} s = {out['new_noop']['over_full_index']:.3%} of a full index estimated at "
          f"{full_s:,.0f} s ({rate:.1f} chunks/s embedding alone)"
          + (f" | old: {out['old']['peak_mb']} MB, {out['old']['seconds']} s" if "old" in out else ""))
    print(f"wrote {results / 'ledger_scale.json'}")


if __name__ == "__main__":
    main()
