"""S4: what an index run deleted or replaced is gone from `query` and from hybrid search the moment the run
returns, in the writer's own client (Strong and Session) and in a fresh client process (Strong)."""

import json
import random
import subprocess
import sys
from collections import defaultdict

import pytest

from tunedex.infra import registry, store
from tunedex.infra.config import load_config
from tunedex.infra.embedding import load_embedder
from tunedex.workers.embed import index_corpus
from tunedex.workers.sources import load_documents

from .indexing_helpers import collection, expected_rows, milvus_server, mutate, write_config, write_corpus

pytestmark = [pytest.mark.scenario(
    "S4", "20 rounds of 1% docs changed + 1% deleted, index, then query and hybrid search at once (same client, fresh process)")]

# A fresh client process: the parent's query vectors and texts on stdin, the rows and hits it saw on stdout.
FRESH_CLIENT = """
import json, sys
from tunedex.infra import store
from tunedex.infra.config import MilvusConfig
job = json.load(sys.stdin)
cfg = MilvusConfig(uri=job["uri"], consistency_level="Strong")
client = store.connect(cfg)
rows = client.query(job["name"], filter=f"doc_id in {json.dumps(job['doc_ids'])}",
                    output_fields=["chunk_id", "doc_id", "doc_version"], consistency_level="Strong")
hits = [[h.chunk_id, h.doc_id, h.doc_version] for q in job["queries"]
        for h in store.hybrid_search(client, cfg, job["name"], q["vector"], q["text"], 10)]
print(json.dumps({"rows": [[r["chunk_id"], r["doc_id"], r["doc_version"]] for r in rows], "hits": hits}))
"""


def visible(client, cfg, name, doc_ids, queries, level):
    """(rows of `doc_ids`, hybrid-search hits of `queries`) as (chunk_id, doc_id, doc_version), read at `level`."""
    rows = client.query(name, filter=f"doc_id in {json.dumps(doc_ids)}", output_fields=["chunk_id", "doc_id", "doc_version"],
                        consistency_level=level)
    at_level = cfg.milvus.model_copy(update={"consistency_level": level})
    hits = [(h.chunk_id, h.doc_id, h.doc_version) for q in queries
            for h in store.hybrid_search(client, at_level, name, q["vector"], q["text"], 10)]
    return {(r["chunk_id"], r["doc_id"], r["doc_version"]) for r in rows}, hits


def fresh_process(cfg, name, doc_ids, queries):
    job = {"uri": cfg.milvus.uri, "name": name, "doc_ids": doc_ids, "queries": queries}
    proc = subprocess.run([sys.executable, "-c", FRESH_CLIENT], input=json.dumps(job), capture_output=True, text=True,
                          timeout=120, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {tuple(r) for r in out["rows"]}, [tuple(h) for h in out["hits"]]


@pytest.mark.slow
def test_deleted_and_replaced_rows_vanish_at_once_from_query_and_hybrid_search(tmp_path, record_property):
    rng = random.Random(4)
    corpus = tmp_path / "corpus"
    write_corpus(corpus, rng, 100)
    config = write_config(tmp_path, "raw")
    with milvus_server(config) as cfg:
        name = collection(cfg)
        client = store.connect(cfg.milvus)  # the writer's client: every run below writes through it
        embedder = load_embedder(cfg.embedding)
        index_corpus(cfg, corpus, client=client)
        checked = defaultdict(int)
        current = expected_rows(corpus, cfg)
        for round_ in range(20):
            before = defaultdict(list)
            for cid, doc_id, version in current:
                before[doc_id].append((cid, version))
            change = mutate(corpus, rng, 0.01, f"r{round_}")
            touched = change["changed"] + change["deleted"]
            # every chunk of a touched doc, by its old text: BM25 and the dense vector both point at the old rows
            old_texts = {r["chunk_id"]: r["text"] for r in client.query(
                name, filter=f"doc_id in {json.dumps(touched)}", output_fields=["chunk_id", "text"], consistency_level="Strong")}
            queries = [{"text": t, "vector": v} for t, v in zip(old_texts.values(), embedder.embed(list(old_texts.values())))]
            _, hits_before = visible(client, cfg, name, touched, queries, "Strong")
            assert set(old_texts) <= {h[0] for h in hits_before}, "the queries must find the rows they test"

            index_corpus(cfg, corpus, client=client)
            current = expected_rows(corpus, cfg)
            now = {(cid, d, v) for cid, d, v in current if d in touched + change["added"]}
            old = {(cid, d, v) for d in touched for cid, v in before[d]} - now
            clients = [("Strong", lambda: visible(client, cfg, name, touched + change["added"], queries, "Strong")),
                       ("Session", lambda: visible(client, cfg, name, touched + change["added"], queries, "Session"))]
            if round_ % 5 == 4:  # a fresh client process, started the moment the run returned
                clients.append(("fresh process", lambda: fresh_process(cfg, name, touched + change["added"], queries)))
            for label, read in clients:
                rows, hits = read()
                assert rows == now, f"round {round_}, {label}: stale {rows - now}, missing {now - rows}"
                assert not old & set(hits), f"round {round_}, {label}: hybrid search returned old rows {old & set(hits)}"
                assert not {h for h in hits if h[1] in change["deleted"]}, f"round {round_}, {label}: a deleted doc"
                checked[label] += len(rows) + len(hits)
            checked["old"] += len(old)
        client.close()
        docs, _ = load_documents(corpus, cfg.corpus)
        assert len(docs) == 100
    record_property("held", (
        f"20 rounds of 1 doc changed + 1 deleted + 1 added (1% each of 100): 0 of {checked['old']} deleted or replaced "
        f"rows visible right after the run, in query and hybrid top-10, in the writer's client (Strong: "
        f"{checked['Strong']} rows and hits read, Session: {checked['Session']}) and in 4 fresh client processes "
        f"({checked['fresh process']}); hybrid search passes milvus.consistency_level on every call "
        f"(the Lite server ignores the level: these figures show Lite, not a Bounded server)"))


def test_hybrid_search_reads_at_the_configured_consistency_level(tmp_path):
    """The serving path (Retriever -> store.hybrid_search) passes `milvus.consistency_level` on each call,
    not the level the collection was created with."""
    seen = {}

    class RecordingClient:
        def hybrid_search(self, name, reqs, **kwargs):
            seen.update(kwargs)
            return [[]]

    cfg = load_config(write_config(tmp_path, "lvl", milvus={"consistency_level": "Session"}))
    assert store.hybrid_search(RecordingClient(), cfg.milvus, "c", [0.0] * 4, "q", 5) == []
    assert seen["consistency_level"] == "Session"


def test_a_release_records_the_consistency_level_it_serves_at(tmp_path):
    release = registry.new_release(tmp_path, "docs__m", "m", consistency_level="Session")
    assert release.consistency_level == "Session"
    registry.save_release(tmp_path / "reg", release)
    assert registry.load_release(tmp_path / "reg", release.release_id).consistency_level == "Session"
