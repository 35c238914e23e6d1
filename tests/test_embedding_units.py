"""The ONNX embedder gives plain sentence-transformers' vectors, on real texts of mixed length."""

from pathlib import Path

import numpy as np
import pytest

from tunedex.infra.config import EmbeddingConfig
from tunedex.infra.embedding import load_embedder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(EmbeddingConfig(backend="onnx", batch_size=8))


def test_onnx_vectors_match_plain_encode(embedder):
    assert embedder.session is not None, "backend onnx on cpu should run the exported model"
    paragraphs = [p.strip() for p in (REPO / "README.md").read_text().split("\n\n") if 0 < len(p.strip()) < 900]
    texts = sorted(set(paragraphs), key=len)[::2]  # a few words up to long paragraphs, all within the limit
    texts.append(" ".join(paragraphs))  # far over the token limit: truncated like encode does, and counted
    ours = np.asarray(embedder.embed(texts))
    plain = embedder.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    cosines = (ours * plain).sum(1)
    assert cosines.min() >= 0.999, f"chunk {int(cosines.argmin())}: cosine {cosines.min():.5f} against plain encode"
    assert embedder.truncated == 1
    assert len(texts) > 20


def test_empty_and_torch_backend():
    torch_embedder = load_embedder(EmbeddingConfig(backend="torch"))
    assert torch_embedder.session is None and torch_embedder.embed([]) == []
    assert len(torch_embedder.embed(["one short text"])[0]) == torch_embedder.dim
