"""Deterministic ids: the same input always gives the same ids, so every write is an idempotent upsert."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def content_hash(data: bytes | str) -> str:
    """A document's version: the sha256 of its content (first 16 bytes, hex)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:32]


def doc_id_for_path(root: Path, path: Path) -> str:
    """A file's document id: its path relative to the corpus root, with '/' separators."""
    return path.relative_to(root).as_posix()


def chunk_id(doc_id: str, index: int, text: str, model_id: str) -> str:
    """hash(doc id, index, chunk text, embedding model id): changing the model changes every id.

    `index` is the chunk's repeat number among identical texts of its doc (0 for a unique text), so
    repeated chunks get distinct ids and an insertion elsewhere leaves the id unchanged."""
    h = hashlib.sha256()
    for part in (doc_id, str(index), text, model_id):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def slug(name: str) -> str:
    """A Milvus-safe name fragment for a model id or path ('sentence-transformers/all-MiniLM-L6-v2' -> 'all_minilm_l6_v2')."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^0-9a-zA-Z]+", "_", base).strip("_").lower() or "model"
