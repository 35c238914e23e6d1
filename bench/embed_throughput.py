"""Embedding throughput: our embedder (infra/embedding.py, embedding.backend openvino) ÷ plain
`SentenceTransformer.encode(batch_size=32)`, on the same chunks in the same process.

    python bench/embed_throughput.py --repeats 3

Texts are real: the demo corpus (`tunedex demo-data`) and the repo's own docs, chunked by the indexer's chunker
at the configured chunk_size. Arms alternate slice by slice (64 chunks) within each repeat; prints the median
ratio, min/mean cosine per chunk against plain encode, and the chunks over the model's token limit. Writes
bench/results/embed_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from tunedex.demo_data import write_demo_data
from tunedex.infra.config import ChunkingConfig, EmbeddingConfig
from tunedex.infra.embedding import load_embedder, resolve_model_path
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

    ours = load_embedder(EmbeddingConfig(backend="openvino"))
    plain = SentenceTransformer(str(resolve_model_path(ours.model_id)), device="cpu")  # the tutorial way
    chunks = corpus_chunks(ours.tokenizer, ChunkingConfig())
    lengths = [len(e.ids) for e in ours.tokenizer.encode_batch(chunks)]
    over = sum(n > ours.max_tokens + 2 for n in lengths)
    print(f"{len(chunks)} chunks, tokens min/median/max {min(lengths)}/{int(np.median(lengths))}/{max(lengths)}, "
          f"limit {ours.max_tokens} content tokens; over the limit: {over}")

    # Arms alternate slice by slice (first arm swapped each slice): on a shared machine the load changes within
    # seconds, and both arms must see the same load.
    slices = [chunks[i : i + 64] for i in range(0, len(chunks), 64)]
    ratios, cosines = [], None
    for rep in range(args.repeats):
        seconds, ref, vec = [0.0, 0.0], [], []
        for k, part in enumerate(slices):
            for arm in ((0, 1) if (k + rep) % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                if arm == 0:
                    ref.append(plain.encode(part, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                            show_progress_bar=False))
                else:
                    vec.append(np.asarray(ours.embed(part), dtype=np.float32))
                seconds[arm] += time.perf_counter() - t0
        ratios.append(seconds[0] / seconds[1])
        cosines = (np.concatenate(ref) * np.concatenate(vec)).sum(1)
        print(f"repeat {rep + 1}: encode {len(chunks) / seconds[0]:.1f} chunks/s, ours {len(chunks) / seconds[1]:.1f} "
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
