"""The OpenVINO embedder gives plain sentence-transformers' vectors, on real texts of mixed length, and loads
from its cached export without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tunedex.infra.config import ConfigError, EmbeddingConfig, load_config
from tunedex.infra.embedding import (BATCH_TOKENS, EmbeddingModelError, load_embedder, load_tokenizer,
                                     resolve_model_path, token_batches)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(EmbeddingConfig(backend="openvino", batch_size=8))


@pytest.fixture(scope="module")
def texts():
    paragraphs = [p.strip() for p in (REPO / "README.md").read_text().split("\n\n") if 0 < len(p.strip()) < 900]
    return sorted(set(paragraphs), key=len)[::2]  # a few words up to long paragraphs, all within the limit


def test_openvino_vectors_match_plain_encode(embedder, texts):
    from sentence_transformers import SentenceTransformer

    assert embedder.compiled is not None and embedder.model is None, "backend openvino on cpu should run the export"
    texts = [*texts, " ".join(texts)]  # far over the token limit: truncated like encode does, and counted
    ours = np.asarray(embedder.embed(texts))
    plain = SentenceTransformer(str(resolve_model_path("all-MiniLM-L6-v2")), device="cpu")
    ref = plain.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    cosines = (ours * ref).sum(1)
    assert cosines.min() >= 0.999, f"chunk {int(cosines.argmin())}: cosine {cosines.min():.5f} against plain encode"
    assert embedder.truncated == 1 and len(texts) > 20
    assert embedder.dim == plain.get_embedding_dimension() and embedder.max_tokens == plain.max_seq_length - 2


def test_tokenizer_counts_as_transformers_does(texts):
    """The chunker's tokenizer (tokenizer.json, no transformers) gives the ids and offsets the model's transformers
    tokenizer gives: chunk boundaries, and so chunk ids, do not change with the loader."""
    from transformers import AutoTokenizer

    ours, limit = load_tokenizer(EmbeddingConfig())
    theirs = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    for text in texts:
        enc = ours.encode(text, add_special_tokens=False)
        ref = theirs(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        assert enc.ids == ref["input_ids"] and enc.offsets == [tuple(x) for x in ref["offset_mapping"]], text
    assert len(ours.encode(" ".join(texts)).ids) > 1000, "tokenizer.json's own truncation must be off"
    assert limit == 254


def test_token_batches_cover_every_input_once_within_the_row_and_token_caps():
    lengths = sorted([3] * 40 + [100] * 9 + [200] * 3 + [5000])  # 5000: one row over the token cap alone
    batches = token_batches(lengths, max_rows=32)
    covered = [i for b in batches for i in range(len(lengths))[b]]
    assert covered == list(range(len(lengths)))
    for b in batches:
        rows = lengths[b]
        assert len(rows) <= 32 and (len(rows) == 1 or len(rows) * max(rows) <= BATCH_TOKENS), rows
    assert [len(lengths[b]) for b in batches][:2] == [32, 10] and lengths[batches[-1]] == [5000]
    assert token_batches([], 8) == []


def test_a_cached_export_loads_without_torch(embedder, texts):
    """With the export cached (the fixture made it), a fresh process embeds without importing torch, transformers or
    sentence-transformers (seconds of every `tunedex index` run), and gets the same vectors; loading OpenVINO
    neither forks nor connects anywhere (its telemetry would do both)."""
    probe = ("import json, sys\nevents = []\n"
             "sys.addaudithook(lambda e, a: e in ('os.fork', 'socket.connect', 'subprocess.Popen') and events.append(e))\n"
             "from tunedex.infra.config import EmbeddingConfig\n"
             "from tunedex.infra.embedding import load_embedder\n"
             "vectors = load_embedder(EmbeddingConfig()).embed(json.loads(sys.stdin.read()))\n"
             "print(json.dumps([vectors, [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules], events]))")
    out = subprocess.run([sys.executable, "-c", probe], input=json.dumps(texts[:8]), capture_output=True, text=True, check=True)
    vectors, imported, events = json.loads(out.stdout.splitlines()[-1])
    assert imported == [] and events == []
    assert np.allclose(vectors, embedder.embed(texts[:8]), atol=1e-5)


def test_many_threads_embedding_at_once_neither_hang_nor_mix_their_vectors(embedder, texts):
    """The retriever embeds each query in its own thread. Per-call OpenVINO requests deadlocked the process within a
    few rounds of 8 threads (a Retriever replica froze mid-query in CI's S8); a deadlock holds the GIL, so the check
    runs in a child process that a timeout can end."""
    probe = ("import json, sys, threading\n"
             "from tunedex.infra.config import EmbeddingConfig\n"
             "from tunedex.infra.embedding import load_embedder\n"
             "texts, e, wrong = json.loads(sys.stdin.read()), load_embedder(EmbeddingConfig()), []\n"
             "alone = {t: e.embed([t])[0] for t in texts}\n"
             "def work(i):\n"
             "    for j in range(40):\n"
             "        t = texts[(i + j) % len(texts)]\n"
             "        v = e.embed([t])[0]\n"
             "        if max(abs(a - b) for a, b in zip(v, alone[t])) > 1e-4: wrong.append(t)\n"
             "for _ in range(10):\n"
             "    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]\n"
             "    [t.start() for t in threads]; [t.join() for t in threads]\n"
             "print(json.dumps(wrong))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as Ray sets it in a replica with num_cpus < 2
    try:
        out = subprocess.run([sys.executable, "-c", probe], input=json.dumps(texts[:8]), capture_output=True, text=True,
                             check=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("8 threads embedding at once did not finish 3,200 one-text calls in 10 minutes: deadlocked")
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_torch_backend_and_empty_input():
    torch_embedder = load_embedder(EmbeddingConfig(backend="torch"))
    assert torch_embedder.compiled is None and torch_embedder.embed([]) == []
    assert len(torch_embedder.embed(["one short text"])[0]) == torch_embedder.dim == 384


def test_the_old_onnx_backend_and_a_missing_model_say_what_to_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("embedding:\n  backend: onnx\n")
    with pytest.raises(ConfigError, match="set embedding.backend: openvino"):
        load_config(path)
    with pytest.raises(EmbeddingModelError, match="is not a model dir"):
        load_embedder(EmbeddingConfig(model=str(tmp_path / "nowhere")))
    # a hub id that is not in the local cache, hub unreachable: the error names the model and what to set
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    probe = ("from tunedex.infra.config import EmbeddingConfig\nfrom tunedex.infra.embedding import load_tokenizer\n"
             "load_tokenizer(EmbeddingConfig(model='someone/not-cached-model'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "embedding.model 'someone/not-cached-model' could not be loaded" in out.stderr
