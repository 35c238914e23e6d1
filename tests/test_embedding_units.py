"""The ONNX embedder gives plain sentence-transformers' vectors, on real texts of mixed length."""

from pathlib import Path

import numpy as np
import pytest

from tunedex.infra.config import EmbeddingConfig
from tunedex.infra.embedding import ONNX_BATCH_TOKENS, _onnx_export, load_embedder, onnx_batches, resolve_model_path

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


def test_onnx_batches_cover_every_input_once_within_the_row_and_token_caps():
    lengths = sorted([3] * 40 + [100] * 9 + [200] * 3 + [5000])  # 5000: one row over the token cap alone
    batches = onnx_batches(lengths, max_rows=32)
    covered = [i for b in batches for i in range(len(lengths))[b]]
    assert covered == list(range(len(lengths)))
    for b in batches:
        rows = lengths[b]
        assert len(rows) <= 32 and (len(rows) == 1 or len(rows) * max(rows) <= ONNX_BATCH_TOKENS), rows
    assert [len(lengths[b]) for b in batches][:2] == [32, 10] and lengths[batches[-1]] == [5000]
    assert onnx_batches([], 8) == []


def test_onnx_model_is_fused_and_torch_model_untouched(embedder):
    """The cached BERT export carries onnxruntime's fused ops (the speed-up), while the torch model that serves
    plain encode keeps the attention it was loaded with."""
    import onnx

    path = _onnx_export(embedder.model, resolve_model_path(embedder.model_id))  # the cached file the session runs
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops, f"{path.name} has no fused attention: {sorted(ops)}"
    assert embedder.model[0].auto_model.config._attn_implementation != "eager"


def test_empty_and_torch_backend():
    torch_embedder = load_embedder(EmbeddingConfig(backend="torch"))
    assert torch_embedder.session is None and torch_embedder.embed([]) == []
    assert len(torch_embedder.embed(["one short text"])[0]) == torch_embedder.dim
