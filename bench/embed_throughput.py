"""Embedding throughput: our embedder (infra/embedding.py, embedding.backend onnx) ÷ plain
`SentenceTransformer.encode(batch_size=32)`, on the same chunks in the same process.

    python bench/embed_throughput.py --repeats 3

Texts are real: the demo corpus (`tunedex demo-data`) and the repo's own docs, chunked by the indexer's chunker
at the configured chunk_size. Arms alternate within each repeat; prints the median ratio, min/mean cosine per
chunk against plain encode, and the chunks over the model's token limit. Writes bench/results/embed_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tunedex.demo_data import write_demo_data
from tunedex.infra.config import ChunkingConfig, EmbeddingConfig
from tunedex.infra.embedding import load_embedder
from tunedex.workers.chunking import chunk_text

REPO = Path(__file__).resolve().parents[1]


def corpus_chunks(tokenizer, chunking: ChunkingConfig) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_data(Path(tmp))["day1"]
        files = sorted(demo.rglob("*.md")) + [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
        texts = [f.read_text() for f in files]
    return [c for t in texts for c in chunk_text(t, tokenizer, chunking.chunk_size, chunking.chunk_overlap)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ours = load_embedder(EmbeddingConfig(backend="onnx"))
    plain = ours.model  # the same SentenceTransformer, run the tutorial way
    chunks = corpus_chunks(ours.tokenizer, ChunkingConfig())
    lengths = [len(x) for x in ours.tokenizer(chunks, truncation=False, verbose=False)["input_ids"]]
    over = sum(n > ours.max_tokens + 2 for n in lengths)
    print(f"{len(chunks)} chunks, tokens min/median/max {min(lengths)}/{int(np.median(lengths))}/{max(lengths)}, "
          f"limit {ours.max_tokens} content tokens; over the limit: {over}")

    ratios, cosines = [], None
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        ref = plain.encode(chunks, batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        t1 = time.perf_counter()
        vec = np.asarray(ours.embed(chunks), dtype=np.float32)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        cosines = (ref * vec).sum(1)
        print(f"repeat {rep + 1}: encode {len(chunks) / (t1 - t0):.1f} chunks/s, ours {len(chunks) / (t2 - t1):.1f} "
              f"chunks/s, ratio {ratios[-1]:.2f}x")
    result = {"chunks": len(chunks), "ratios": ratios, "ratio_median": statistics.median(ratios),
              "cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean()),
              "over_limit": over, "truncated_by_embedder": ours.truncated}
    print(f"embed ÷ encode {result['ratio_median']:.2f}x (median of {args.repeats}), cosine min {result['cosine_min']:.6f} "
          f"mean {result['cosine_mean']:.6f}, chunks over the token limit {over} (target >= 1.5x, >= 0.999, 0)")
    out = REPO / "bench" / "results" / "embed_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(out)


if __name__ == "__main__":
    main()
