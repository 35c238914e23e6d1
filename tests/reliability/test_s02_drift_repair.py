"""S2: rows changed behind tunedex's back (deleted, orphaned, re-tagged with a wrong version, whole docs
dropped) are found and repaired by the next plain `tunedex index` run over the unchanged corpus."""

import random
import time
from collections import defaultdict

import pytest

from tunedex.infra import store
from tunedex.workers.embed import index_corpus

from .indexing_helpers import ALL_FIELDS, check_equals_corpus, collection, milvus_server, run_index, write_config, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.scenario(
    "S2", "behind tunedex's back: 5% of rows deleted, 20 orphans inserted, 10 rows re-tagged, 3 docs dropped; one index run")]

def introduce_drift(client, name: str, rng: random.Random) -> dict[str, int]:
    """Damage the collection directly through pymilvus; returns what the repair run must report."""
    rows_of = defaultdict(list)
    for r in store.iter_rows(client, name, ["chunk_id", "doc_id", "doc_version", "doc_chunks"]):
        rows_of[r["doc_id"]].append(r)
    total = sum(map(len, rows_of.values()))
    docs = sorted(rows_of)
    rng.shuffle(docs)
    multi = [d for d in docs if len(rows_of[d]) >= 2]
    stale_docs = multi[:10]  # one row each re-tagged; their other rows keep the current version
    dropped_docs = [d for d in docs if d not in stale_docs][:3]  # every row gone: the store forgets the doc
    orphan_docs = [d for d in docs if d not in stale_docs + dropped_docs][:10]
    rest = [d for d in docs if d not in stale_docs + dropped_docs + orphan_docs]

    # 10 rows upserted with a wrong doc_version (the vector and text kept)
    picked = [rows_of[d][0]["chunk_id"] for d in stale_docs]
    full = client.get(name, ids=picked, output_fields=ALL_FIELDS)
    client.upsert(name, [{**r, "doc_version": "0" * 32} for r in full])
    # 20 orphans: chunk ids no document produces, for docs that exist, tagged with their current version
    dim = len(full[0]["dense"])
    orphans = []
    for i in range(20):
        owner = rows_of[orphan_docs[i % len(orphan_docs)]][0]
        vec = [rng.gauss(0, 1) for _ in range(dim)]
        norm = sum(v * v for v in vec) ** 0.5
        orphans.append({"chunk_id": f"orphan{i:026d}", "doc_id": owner["doc_id"], "doc_version": owner["doc_version"],
                        "doc_chunks": owner["doc_chunks"], "chunk_index": 100 + i, "text": f"orphan row {i} kettle",
                        "metadata": {}, "dense": [v / norm for v in vec]})
    client.insert(name, orphans)
    # all rows of 3 docs deleted: with no manifest (the collection is the ledger), a doc the ledger forgets is
    # one with no rows, and the run re-embeds it as a doc it has not seen (docs_added)
    client.delete(name, ids=[r["chunk_id"] for d in dropped_docs for r in rows_of[d]])
    # 5% of the rows deleted, at random among the other docs; a doc that loses every row is also forgotten
    candidates = [r["chunk_id"] for d in rest for r in rows_of[d]]
    deleted = set(rng.sample(candidates, round(0.05 * total)))
    client.delete(name, ids=sorted(deleted))
    client.flush(name)
    emptied = [d for d in rest if all(r["chunk_id"] in deleted for r in rows_of[d])]
    partly = [d for d in rest if d not in emptied and any(r["chunk_id"] in deleted for r in rows_of[d])]
    return {
        "deleted": len(deleted), "emptied_docs": len(emptied), "total": total,
        "drift": {"docs": len(stale_docs) + len(orphan_docs) + len(partly),
                  "missing": sum(r["chunk_id"] in deleted for d in partly for r in rows_of[d]),
                  "orphans": 20, "stale": 10},
        "docs_added": len(dropped_docs) + len(emptied),
        "chunks_embedded": len(deleted) + sum(len(rows_of[d]) for d in dropped_docs),
    }


def test_one_index_run_reports_and_repairs_rows_changed_behind_its_back(tmp_path, record_property):
    rng = random.Random(2)
    corpus = tmp_path / "corpus"
    write_corpus(corpus, rng, 120)
    config = write_config(tmp_path, "drift")
    with milvus_server(config) as cfg:
        full = index_corpus(cfg, corpus)  # in this process: the model is warm for the no-op timing below
        client = store.connect(cfg.milvus)
        try:
            want = introduce_drift(client, collection(cfg), rng)
        finally:
            client.close()

        report, stderr = run_index(config, corpus)  # the user's command, over the unchanged corpus
        assert report["drift"] == want["drift"], (report["drift"], want)
        assert "drifted from the corpus" in stderr
        assert (report["docs_added"], report["docs_changed"], report["docs_removed"]) == (want["docs_added"], 0, 0)
        assert report["chunks_embedded"] == want["chunks_embedded"]  # the missing rows, and nothing stored
        assert (report["chunks_retagged"], report["chunks_deleted"]) == (10, 20)
        figures = check_equals_corpus(cfg, corpus)

        noop, _ = run_index(config, corpus)
        assert (noop["chunks_embedded"], noop["chunks_retagged"], noop["chunks_deleted"]) == (0, 0, 0)
        assert not any(noop["drift"].values()) and noop["docs_unchanged"] == 120
        # P1: a no-op run costs <= 2% of a full index. A ratio of two timings moves with the machine's load, so it
        # is recorded, not asserted (bench/ holds the timing); what is asserted is the behaviour behind it: a no-op
        # run embeds, retags and deletes nothing. Timed in a warm process (the nightly flow's case); a fresh
        # process adds its start-up, which the CLI run above records in its `seconds`.
        warm = []
        for _ in range(3):
            started = time.monotonic()
            assert index_corpus(cfg, corpus).chunks_embedded == 0
            warm.append(time.monotonic() - started)

    d = report["drift"]
    record_property("held", (
        f"drift reported: missing {d['missing']} (of {want['deleted']} rows deleted; {want['emptied_docs']} docs lost "
        f"every row), orphans {d['orphans']}, stale {d['stale']}, in {d['docs']} docs; 3 docs with every row deleted "
        f"(what replaces a truncated manifest: the collection is the ledger) re-embedded as docs_added "
        f"({report['docs_added']} in all); after the run 0 duplicates, 0 missing, 0 stale in {figures['rows']} rows; "
        f"a no-op run embedded 0 in {min(warm):.2f} s warm = {100 * min(warm) / full.seconds:.1f}% of the full "
        f"index's {full.seconds:.0f} s ({noop['seconds']:.1f} s in a fresh process; recorded, not asserted)"))
