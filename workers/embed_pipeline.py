"""Embedding on Ray Data: chunks flow through an actor pool of model replicas spread over the
cluster's GPUs or CPUs, and come back to the indexer in batches to be written.

Only (chunk_id, text) travel; the indexer keeps the rest of each row and joins by chunk id.
Chunks are sorted by length first, so each batch pads little.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from tunedex.infra.config import TunedexConfig


class EmbedReplica:
    """One model replica: loaded once per actor, then called on batches."""

    def __init__(self, embedding: dict[str, Any]):
        from tunedex.infra.config import EmbeddingConfig
        from tunedex.infra.embedding import load_embedder

        self.embedder = load_embedder(EmbeddingConfig(**embedding))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.embedder.embed([str(t) for t in batch["text"]])
        return {"chunk_id": batch["chunk_id"], "dense": np.asarray(vectors, dtype=np.float32)}


def embed_with_ray(texts: dict[str, str], cfg: TunedexConfig, batch_size: int) -> Iterator[dict[str, list[float]]]:
    """Yield {chunk_id: vector} batches of about `batch_size` as the replicas finish them."""
    from tunedex.infra.services import connect_ray

    with connect_ray(cfg) as ray:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the indexer prints its own progress lines
        items = [{"chunk_id": cid, "text": text} for cid, text in sorted(texts.items(), key=lambda kv: len(kv[1]))]
        emb = cfg.embedding
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // emb.batch_size)).map_batches(
            EmbedReplica,
            fn_constructor_kwargs={"embedding": emb.model_dump(mode="json")},
            batch_size=emb.batch_size,
            concurrency=emb.replicas,
            num_cpus=emb.cpus_per_replica,
            num_gpus=emb.gpus_per_replica,
        )
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield {str(cid): vec.tolist() for cid, vec in zip(batch["chunk_id"], batch["dense"])}
