"""Indexing into the real Milvus Lite server: idempotent, incremental, deletes propagate."""

import pytest

from tunedex.infra import store
from tunedex.infra.config import load_config
from tunedex.workers.embed import index_corpus
from tunedex.workers.sources import load_documents

pytestmark = pytest.mark.slow


def _stored(cfg, name):
    client = store.connect(cfg.milvus)
    try:
        return {(r["chunk_id"], r["doc_id"], r["doc_version"]) for r in store.iter_rows(client, name, store.LEDGER_FIELDS)}
    finally:
        client.close()


@pytest.fixture
def cfg(stack, request):
    """The stack's config with a collection of this test's own."""
    return load_config(stack[0], [f"milvus.collection={request.node.name.removeprefix('test_')[:40]}"])


def test_index_twice_leaves_the_same_rows_then_day2_syncs(cfg, demo):
    first = index_corpus(cfg, demo["day1"])
    rows1 = _stored(cfg, first.collection)
    assert first.chunks_embedded == first.chunks_total == len(rows1) > 0
    assert first.docs_added == 33 and first.docs_failed == 0

    again = index_corpus(cfg, demo["day1"])
    assert _stored(cfg, first.collection) == rows1
    assert (again.chunks_embedded, again.chunks_deleted, again.docs_unchanged) == (0, 0, 33)

    day2 = index_corpus(cfg, demo["day2"])
    assert (day2.docs_added, day2.docs_removed) == (3, 2)
    rows2 = _stored(cfg, first.collection)
    docs2, _ = load_documents(demo["day2"], cfg.corpus)
    assert {doc_id for _, doc_id, _ in rows2} == {d.doc_id for d in docs2}
    assert {(doc_id, version) for _, doc_id, version in rows2} == {(d.doc_id, d.version) for d in docs2}
    assert day2.chunks_embedded < first.chunks_embedded  # only new and changed chunks

    back = index_corpus(cfg, demo["day1"])  # leave day 1 indexed for the tests after this one
    assert _stored(cfg, first.collection) == rows1 and back.docs_removed == 3


def test_dry_run_writes_nothing(cfg, demo, tmp_path):
    index_corpus(cfg, demo["day1"])
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "new.md").write_text("A brand new document about the Zephyr Kettle 900.")
    plan = index_corpus(cfg, corpus, dry_run=True)
    assert plan.dry_run and plan.docs_added == 1 and plan.docs_removed == 33
    assert plan.chunks_embedded == plan.chunks_deleted == 0
    client = store.connect(cfg.milvus)
    assert store.count_rows(client, plan.collection) == plan.chunks_total
    client.close()
