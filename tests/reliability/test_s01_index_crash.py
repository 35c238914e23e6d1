"""S1: `kill -9` the indexer at 10 random moments of a full index (3 times the Milvus Lite server too),
with a 1% change to the corpus between kills 5 and 6; after one clean run the collection equals the
corpus exactly: nothing missing, duplicated or stale, and the clean run embedded only what was not stored."""

import random
import signal
import subprocess
import time

import pytest

from tunedex.infra import store

from .indexing_helpers import (check_equals_corpus, collection, connect_loaded, expected_rows, index_cmd, kill_milvus_and_restart,
                               milvus_server, mutate, run_index, write_config, write_corpus)

pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.scenario(
    "S1", "kill -9 of `tunedex index` at 10 moments uniform in a full index (3 with the Milvus Lite server), 1% churn between kills 5 and 6")]


def stored_ids(cfg) -> set[str]:
    client = connect_loaded(cfg)
    try:
        return {r["chunk_id"] for r in store.iter_rows(client, collection(cfg), ["chunk_id"])} \
            if client.has_collection(collection(cfg)) else set()
    finally:
        client.close()


def test_kill_indexer_and_milvus_at_random_points_then_rerun_equals_corpus(tmp_path, record_property):
    rng = random.Random(1234)
    corpus = tmp_path / "corpus"
    write_corpus(corpus, rng, 200)
    config = write_config(tmp_path, "crash")
    with milvus_server(config) as cfg:
        started = time.monotonic()
        run_index(config, corpus)
        t_full = time.monotonic() - started  # T_full, measured once: a full index from nothing, process start included
        probe = sorted(p for p in corpus.rglob("*") if p.is_file())[0]
        probe.write_text(probe.read_text() + " probe")  # one changed doc: the run loads the model, as a real one does
        started = time.monotonic()
        run_index(config, corpus)
        t_start = time.monotonic() - started  # start-up, corpus and ledger read, model load, one doc written
        t_write = max(t_full - t_start, 0.5 * t_full)  # the full index's writing time
        full_rows = len(stored_ids(cfg))
        client = store.connect(cfg.milvus)
        client.drop_collection(collection(cfg))  # the kill loop starts from nothing
        client.close()

        # 10 moments uniform in the full index's writing time. Run k resumes the index where the kills left it
        # and dies when its own writing (from its first stored row) reaches moment k: start-up, which differs
        # from run to run (model load, a restarted server), is not on that clock.
        moments = sorted(rng.uniform(0, t_write) for _ in range(10))
        with_milvus = set(rng.sample(range(10), 3))
        kills, rows_after_kill = 0, []
        for k, moment in enumerate(moments):
            if k == 5:  # between kills 5 and 6: 1% of the docs changed, 1% deleted, 1% added
                before = {r[0] for r in expected_rows(corpus, cfg)}
                mutate(corpus, rng, 0.01, "m")
                after = {r[0] for r in expected_rows(corpus, cfg)}
                changed_chunks = len(after - before)
            gap = moment if k == 0 else moments[k] - moments[k - 1]
            rows_before = len(stored_ids(cfg))
            proc = subprocess.Popen(index_cmd(config, corpus), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 3 * t_start + 30
            while proc.poll() is None and time.monotonic() < deadline and len(stored_ids(cfg)) == rows_before:
                time.sleep(0.1)  # until this run has written
            time.sleep(gap)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
            if k in with_milvus:  # the Milvus Lite server dies at the same moment; unflushed writes with it
                kill_milvus_and_restart(cfg)
            rows_after_kill.append(len(stored_ids(cfg)))
        # runs after the index is whole only have the 1% churn to write and may finish before their moment;
        # the first five start from a partial index and must each die mid-write
        assert kills >= 5, f"only {kills} of 10 runs were still running at their kill moment: the loop did not test crashes"
        mid_write = sum(0 < n < full_rows for n in rows_after_kill[:5])  # before the churn: a partial index
        assert mid_write >= 2, f"fewer than 2 kills left a partial index: rows after each kill {rows_after_kill}"
        not_stored = len({r[0] for r in expected_rows(corpus, cfg)} - stored_ids(cfg))
        final, _ = run_index(config, corpus)
        figures = check_equals_corpus(cfg, corpus)
        # the clean run embeds what the kills left undone and what the 1% churn changed, never a stored chunk again
        assert final["chunks_embedded"] <= not_stored, (final["chunks_embedded"], not_stored)
        again, _ = run_index(config, corpus)
        assert again["chunks_embedded"] == again["chunks_retagged"] == again["chunks_deleted"] == 0
        assert again["docs_unchanged"] == 200 and not any(again["drift"].values())

    record_property("held", (
        f"0 duplicates, 0 missing, 0 stale in {figures['rows']:,} rows (Strong query == expected set, count(*) == "
        f"len(expected)) after {kills} kills ({len(with_milvus)} with the Milvus Lite server) at moments "
        f"{', '.join(f'{m:.0f}' for m in moments)} s of the full index's {t_write:.0f} s of writing; rows stored after each kill "
        f"{rows_after_kill} of {full_rows} ({mid_write} of kills 1-5 mid-write); final clean run embedded {final['chunks_embedded']} <= {not_stored} chunks not stored "
        f"({changed_chunks} changed by the 1% churn), repaired drift in {final['drift']['docs']} docs; "
        f"a no-op run after it embedded 0; no manifest to compare: the collection is the ledger"))
