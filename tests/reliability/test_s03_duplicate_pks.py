"""S3: duplicate primary keys never reach the store: a JSONL id repeated is a reported data error with a
fixed winner, a file reached twice is indexed once, the writer dedups each batch, re-writes are upserts."""

import ast
import hashlib
import json
from pathlib import Path

import pytest

from tunedex.infra import store
from tunedex.infra.config import CorpusConfig, load_config
from tunedex.infra.ids import content_hash
from tunedex.workers import embed
from tunedex.workers.embed import SyncPlan, chunk_rows, plan_sync, write_plan
from tunedex.workers.sources import Document, load_documents

from .indexing_helpers import ALL_FIELDS, check_equals_corpus, collection, milvus_server, run_index, write_config

pytestmark = [pytest.mark.scenario(
    "S3", "a JSONL id twice with other text, a doc reached through a symlink and an overlapping glob, a batch re-written")]

REPO = Path(__file__).resolve().parents[2]


class FakeServerSemanticsStore:
    """The parts of a Milvus server's write semantics the writer must survive: a plain insert with an existing
    key adds a second row (milvus#52047); an upsert batch that repeats a key is refused (Milvus >= 2.6)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.batches: list[list[str]] = []

    def has_collection(self, name: str) -> bool:
        return True

    def insert(self, name: str, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def upsert(self, name: str, rows: list[dict]) -> None:
        keys = [r["chunk_id"] for r in rows]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate primary keys are not allowed in the same batch")
        self.batches.append(keys)
        self.rows = [r for r in self.rows if r["chunk_id"] not in set(keys)] + rows

    def flush(self, name: str) -> None:
        pass

    def delete(self, name: str, ids: list[str]) -> None:
        self.rows = [r for r in self.rows if r["chunk_id"] not in set(ids)]

    def get(self, name: str, ids: list[str], output_fields: list[str]) -> list[dict]:
        return [r for r in self.rows if r["chunk_id"] in set(ids)]


def hash_embedder(texts: list[str]) -> list[list[float]]:
    return [[b / 255 for b in hashlib.sha256(t.encode()).digest()[:8]] for t in texts]


def splitter(text: str) -> list[str]:
    return [p for p in text.split("|") if p]


def test_jsonl_id_twice_is_a_data_error_naming_the_file_and_lines_and_the_last_line_wins(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    lines = [{"id": "a", "text": "first text"}, {"id": "b", "text": "other"}, {"id": "a", "text": "second text"},
             {"id": "a", "text": "third text"}]
    (root / "recs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    docs, skipped = load_documents(root, CorpusConfig())
    assert {d.doc_id: d.text for d in docs} == {"recs.jsonl#a": "third text", "recs.jsonl#b": "other"}
    [error] = skipped
    assert error.kind == "duplicate" and error.doc_id == "recs.jsonl#a" and error.source == "recs.jsonl"
    assert "recs.jsonl has 'id' 'a' on lines 1, 3 and 4; line 4 wins" in error.reason
    # the rule depends on the file only: the same lines in another order pick the (new) last one
    (root / "recs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(lines)))
    docs, _ = load_documents(root, CorpusConfig())
    assert {d.doc_id: d.text for d in docs}["recs.jsonl#a"] == "first text"


def test_a_file_reached_through_a_symlink_and_an_overlapping_glob_is_one_document(tmp_path):
    root = tmp_path / "corpus"
    (root / "real").mkdir(parents=True)
    (root / "real" / "guide.md").write_text("the kettle guide")
    (root / "alias.md").symlink_to(root / "real" / "guide.md")
    (root / "mirror").symlink_to(root / "real")  # a symlinked dir: `mirror/*.md` overlaps `**/*.md`
    (root / "dangling.md").symlink_to(root / "gone.md")
    docs, skipped = load_documents(root, CorpusConfig(include=["**/*.md", "mirror/*.md"]))
    assert [d.doc_id for d in docs] == ["real/guide.md"]
    reasons = {s.doc_id: (s.kind, s.reason) for s in skipped}
    assert reasons["alias.md"] == ("duplicate", "same file as real/guide.md (a symlink or an overlapping corpus.include "
                                                "glob); indexed once, as real/guide.md")
    assert reasons["mirror/guide.md"][0] == "duplicate"
    assert reasons["dangling.md"] == ("unreadable", "broken symlink (its target gone.md is not a file); fix or delete the link")
    rows = plan_sync(docs, {}, set(), splitter, "m").to_embed
    assert len(rows) == len({r["chunk_id"] for r in rows})


def test_a_doc_listed_twice_is_refused_by_the_plan():
    doc = Document("a.md", content_hash("x"), "x")
    with pytest.raises(ValueError, match="document a.md is listed twice"):
        plan_sync([doc, doc], {}, set(), splitter, "m")


def test_the_writer_sends_no_batch_with_a_repeated_key_and_rewrites_are_upserts(monkeypatch, tmp_path):
    monkeypatch.setattr(embed, "load_embedder", lambda cfg: type("E", (), {"embed": staticmethod(hash_embedder)})())
    cfg = load_config(write_config(tmp_path, "fake", milvus={"write_batch_size": 2}))
    doc = Document("a.md", content_hash("a1|a2|a3"), "a1|a2|a3")
    rows = chunk_rows(doc, splitter(doc.text), "m")
    fake = FakeServerSemanticsStore()
    plan = SyncPlan(to_embed=rows + rows[:2])  # a batch built to hold the same chunk ids twice
    assert write_plan(fake, cfg, "c", plan).embedded == 3
    assert all(len(b) == len(set(b)) for b in fake.batches) and len(fake.rows) == 3
    # re-writing an already written batch (a retry after a lost acknowledgement) changes nothing
    write_plan(fake, cfg, "c", SyncPlan(to_retag=rows + rows))
    assert len(fake.rows) == len({r["chunk_id"] for r in fake.rows}) == 3
    fake.insert("c", rows[:1])  # what a plain insert would have done on a server
    assert len(fake.rows) == 4


def test_no_module_under_infra_or_workers_calls_insert():
    """Every write is an upsert: on a Milvus server an insert with an existing key adds a second row."""
    calls = []
    for path in sorted([*(REPO / "infra").rglob("*.py"), *(REPO / "workers").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "insert":
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls == [], f"use store.upsert_rows, not insert: {calls}"
    assert "client.upsert(" in (REPO / "infra" / "store.py").read_text()  # the scan reads the real sources


@pytest.mark.slow
def test_duplicates_on_the_lite_server_reach_the_store_once(tmp_path, record_property):
    root = tmp_path / "corpus"
    (root / "real").mkdir(parents=True)
    (root / "real" / "guide.md").write_text("# Kettle guide\nDescale the Zephyr Kettle 900 monthly.")
    (root / "alias.md").symlink_to(root / "real" / "guide.md")
    (root / "mirror").symlink_to(root / "real")
    (root / "faq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": 7, "text": "Returns are free within 30 days."}, {"id": 8, "text": "Shipping is free over 50 EUR."},
        {"id": 7, "text": "Returns are free within 60 days."}]))
    config = write_config(tmp_path, "dups", corpus={"include": ["**/*.md", "mirror/*.md", "**/*.jsonl"]})
    with milvus_server(config) as cfg:
        report, stderr = run_index(config, root)
        assert "faq.jsonl has 'id' '7' on lines 1 and 3; line 3 wins" in stderr
        assert "alias.md: same file as real/guide.md" in stderr
        assert report["docs_added"] == 3 and report["docs_failed"] == 0
        figures = check_equals_corpus(cfg, root)
        client = store.connect(cfg.milvus)
        try:
            name = collection(cfg)
            texts = [r["text"] for r in store.iter_rows(client, name, ["text"])]
            assert "Returns are free within 60 days." in texts and "Returns are free within 30 days." not in texts
            # re-write every stored row, some of them twice in one batch: still one row per key
            # plain dicts: pymilvus fills a query result's fields lazily, on item access, which `list +` skips
            stored = [dict(r) for r in client.query(name, filter="", output_fields=ALL_FIELDS, limit=100)]
            assert store.upsert_rows(client, name, stored + stored[:2]) == len(stored)
            count = store.count_rows(client, name)
            distinct = len({r["chunk_id"] for r in store.iter_rows(client, name, ["chunk_id"])})
            assert count == distinct == figures["rows"]
            # what the static test guards against: the Lite server's own answer to a plain insert of a stored key
            client.insert(name, stored[:1])
            client.flush(name)
            after_insert = store.count_rows(client, name)
        finally:
            client.close()
    record_property("held", (
        f"JSONL id 7 on lines 1 and 3 reported with both lines, line 3 indexed; alias.md and mirror/guide.md "
        f"indexed once as real/guide.md; {figures['rows']} rows, re-written with 2 keys twice in one batch: "
        f"count(*) {count} == distinct pk {distinct}; no .insert( under infra/ or workers/ (the Lite server "
        f"itself turned a plain insert of a stored key into {after_insert - count} extra rows)"))
