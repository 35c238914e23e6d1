"""Incremental indexing benchmark: a no-op re-run and a 1% change, each against a full index, in one run.

    python bench/index_noop.py --docs 10000        # ~20k chunks; prints ratios and writes bench/results/index_noop.json

Targets (issue 4): no-op / full <= 2%; 1% changed: chunks embedded / chunks changed == 1.0 and time / full <= 3%.
It starts its own Milvus Lite server on a free port with a temporary data dir.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tunedex.infra import services
from tunedex.infra.services import free_port
from tunedex.infra.config import load_config
from tunedex.infra.logs import setup_logging
from tunedex.workers.embed import index_corpus

WORDS = ("kettle lamp chair desk cable warranty refund shipping battery screen speaker mouse keyboard stock "
         "price order invoice repair replace delivery return colour size model series fabric steel oak").split()


def write_corpus(root: Path, n_docs: int, rng: random.Random) -> None:
    for i in range(n_docs):
        sub = root / f"part{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        # two paragraphs of ~55 tokens each: two chunks per doc at chunk_size 64
        paras = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(2)]
        (sub / f"doc{i:06d}.md").write_text(f"{paras[0]}.\n\n{paras[1]}.")


def change_one_percent(root: Path, rng: random.Random, cfg) -> tuple[int, int]:
    """Edit the last words of 1% of the docs; return (docs changed, chunks whose text is new).

    The changed chunks are counted here from the texts before and after, apart from the indexer.
    """
    from tunedex.infra.embedding import load_tokenizer
    from tunedex.workers.chunking import chunk_text

    tok, _ = load_tokenizer(cfg.embedding)
    size, overlap = cfg.chunking.chunk_size, cfg.chunking.chunk_overlap
    docs = sorted(root.rglob("*.md"))
    picked = rng.sample(docs, max(1, len(docs) // 100))
    changed_chunks = 0
    for path in picked:
        before = set(enumerate(chunk_text(path.read_text(), tok, size, overlap)))
        path.write_text(path.read_text().rstrip(".") + " refurbished.")
        changed_chunks += len(set(enumerate(chunk_text(path.read_text(), tok, size, overlap))) - before)
    return len(picked), changed_chunks


def timed(cfg, root):
    started = time.perf_counter()
    report = index_corpus(cfg, root)
    return time.perf_counter() - started, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/index_noop.json"))
    args = parser.parse_args()
    setup_logging("WARNING")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root, data = Path(tmp) / "corpus", Path(tmp) / "data"
        write_corpus(root, args.docs, rng)
        cfg = load_config(None, [f"data_dir={data}", f"milvus.uri=http://127.0.0.1:{free_port()}",
                                 "chunking.chunk_size=64", "chunking.chunk_overlap=0", "milvus.collection=bench"])
        services.start_milvus(cfg)
        try:
            t_full, full = timed(cfg, root)
            t_noop, noop = timed(cfg, root)
            changed_docs, changed_chunks = change_one_percent(root, rng, cfg)
            t_change, change = timed(cfg, root)
        finally:
            services.stop_milvus(cfg)
    result = {
        "docs": args.docs, "chunks": full.chunks_total, "full_s": round(t_full, 2), "noop_s": round(t_noop, 2),
        "changed_docs": changed_docs, "changed_chunks": changed_chunks, "change_s": round(t_change, 2),
        "noop_over_full": round(t_noop / t_full, 4), "change_over_full": round(t_change / t_full, 4),
        "embedded_over_changed": change.chunks_embedded / changed_chunks,
        "noop_embedded": noop.chunks_embedded, "change_deleted": change.chunks_deleted,
        "change_retagged": change.chunks_retagged,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"no-op / full = {result['noop_over_full']:.2%} (target <= 2%) | 1% change / full = "
          f"{result['change_over_full']:.2%} (target <= 3%) | embedded / changed = {result['embedded_over_changed']:.2f} "
          f"(target 1.00)")


if __name__ == "__main__":
    main()
