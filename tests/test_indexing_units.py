"""Indexing pieces without services: ids, chunking, sources, the sync plan."""

import json
from pathlib import Path

import pytest
from tunedex.infra.config import CorpusConfig, EmbeddingConfig
from tunedex.infra.embedding import load_tokenizer
from tunedex.infra.ids import chunk_id, content_hash, slug
from tunedex.workers.chunking import chunk_text
from tunedex.infra import store
from tunedex.workers.embed import chunk_rows, docs_to_read, plan_sync
from tunedex.workers.sources import Document, load_documents


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EmbeddingConfig())[0]


def test_chunk_ids_are_deterministic_and_model_specific():
    a = chunk_id("d.md", 0, "hello", "all-MiniLM-L6-v2")
    assert a == chunk_id("d.md", 0, "hello", "all-MiniLM-L6-v2")
    assert a != chunk_id("d.md", 0, "hello", "other-model")
    assert a != chunk_id("d.md", 1, "hello", "all-MiniLM-L6-v2")
    assert len(a) == 32
    assert slug("sentence-transformers/all-MiniLM-L6-v2") == "all_minilm_l6_v2"


def test_chunks_follow_boundaries_and_never_exceed_size(tokenizer):
    sentences = [f"Sentence {i} talks about topic {i % 7} in a few words." for i in range(60)]
    text = "\n\n".join(" ".join(sentences[i : i + 4]) for i in range(0, 60, 4))
    text += "\n\n" + " ".join(f"word{i}" for i in range(400))  # one overlong sentence: split by tokens
    chunks = chunk_text(text, tokenizer, size=50, overlap=10)
    sizes = [len(tokenizer.encode(c, add_special_tokens=False).ids) for c in chunks]
    assert max(sizes) <= 50 and chunks == chunk_text(text, tokenizer, size=50, overlap=10)
    assert all(c in text for c in chunks)  # slices of the original text
    assert all(c.endswith(".") for c in chunks if "word" not in c)  # cut at sentence ends
    assert chunks[-1].endswith("word399")
    assert chunk_text("   ", tokenizer, 50, 10) == []


def test_editing_one_sentence_re_embeds_at_most_two_chunks(tokenizer):
    paras = [" ".join(f"Paragraph {p} sentence {s} says something plain." for s in range(5)) for p in range(30)]
    before = "\n\n".join(paras)
    for p in (0, 7, 15, 29):
        edited = before.replace(f"Paragraph {p} sentence 2 says", f"Paragraph {p} sentence 2 now says, at length,")
        old = {r["chunk_id"] for r in chunk_rows(_doc("d", before), chunk_text(before, tokenizer, 64, 0), "m")}
        new = {r["chunk_id"] for r in chunk_rows(_doc("d", edited), chunk_text(edited, tokenizer, 64, 0), "m")}
        assert 1 <= len(new - old) <= 2


def test_an_edit_inside_text_without_sentences_re_embeds_the_windows_near_it(tokenizer):
    """Data or logs with no sentence end: token windows cut on content, so the windows after an edit come back
    unchanged (positional windows all shifted: every chunk after the edit was new)."""
    import random

    rng = random.Random(0)
    values = [f"{rng.random():.4f}" for _ in range(1500)]
    before = " ".join(values)
    chunks = chunk_text(before, tokenizer, 64, 8)
    assert len(chunks) > 40 and max(len(tokenizer.encode(c, add_special_tokens=False).ids) for c in chunks) <= 64
    for at in (10, 700, 1400):
        edited = " ".join(values[:at] + ["0.5", "0.25"] + values[at:])
        new = set(chunk_text(edited, tokenizer, 64, 8)) - set(chunks)
        assert 1 <= len(new) <= 3, (at, len(new))


def test_a_short_page_of_many_paragraphs_stays_one_chunk(tokenizer):
    """A product page (heading, price line, list items) under a quarter of chunk_size is one chunk: retrieval
    returns the facts together, not a lone heading (the content-defined end waits for a minimum size)."""
    import random

    from tunedex.demo_data import make_products, product_markdown

    pages = [product_markdown(p) for p in make_products(random.Random(0), 30)]
    assert all(len(p.split("\n\n")) == 3 for p in pages)
    assert all(chunk_text(p, tokenizer, 200, 32) == [p.strip()] for p in pages)
    tiny = [c for p in pages for c in chunk_text(p * 4, tokenizer, 200, 32)[:-1]]
    assert tiny and min(len(tokenizer.encode(c, add_special_tokens=False).ids) for c in tiny) >= 50


def test_repeated_identical_chunks_get_distinct_ids():
    rows = chunk_rows(_doc("d", "x"), ["same", "other", "same"], "m")
    assert len({r["chunk_id"] for r in rows}) == 3
    shifted = chunk_rows(_doc("d", "x"), ["new", "same", "other", "same"], "m")
    assert {r["chunk_id"] for r in rows} < {r["chunk_id"] for r in shifted}  # an insertion keeps the others' ids


def _doc(doc_id, text):
    return Document(doc_id, content_hash(text), text)


def _plan(docs, rows, keep=frozenset(), chunker=None, read=None):
    """plan_sync over stored `rows` as index_corpus runs it: per-doc states, then the chunks of the docs it names.
    `read` collects the doc ids whose chunks were read."""
    states = store.doc_states(rows)
    needed = docs_to_read(docs, states, set(keep))
    if read is not None:
        read.extend(needed)
    return plan_sync(docs, states, set(keep), chunker or splitter, "m", store.chunks_by_doc(rows, needed))


def splitter(text):
    return [p for p in text.split("|") if p]


def test_plan_skips_unchanged_embeds_only_changed_chunks_and_deletes_removed():
    a, b, c = _doc("a", "a1|a2|a3"), _doc("b", "b1"), _doc("c", "c1|c2")
    rows = sum((chunk_rows(d, splitter(d.text), "m") for d in (a, b, c)), [])
    a2 = _doc("a", "a1|a2-new|a3")
    read = []
    plan = _plan([a2, b], rows, read=read)
    assert sorted(read) == ["a", "c"]  # b did not change: its chunk ids are not read
    assert (plan.docs_unchanged, plan.docs_changed, plan.docs_removed, plan.docs_added) == (1, 1, 1, 0)
    assert [r["text"] for r in plan.to_embed] == ["a2-new"]  # only the changed chunk is embedded
    assert sorted(r["text"] for r in plan.to_retag) == ["a1", "a3"]  # same text, new doc version: no model call
    deleted_texts = {cid for cid in plan.to_delete}
    assert len(deleted_texts) == 3  # a's old "a2" and c's two chunks


def test_plan_on_unchanged_corpus_touches_nothing_and_never_chunks():
    docs = [_doc("a", "x|y"), _doc("b", "z")]
    rows = sum((chunk_rows(d, splitter(d.text), "m") for d in docs), [])

    def must_not_chunk(text):
        raise AssertionError("unchanged docs must not be chunked")

    read = []
    plan = _plan(docs, rows, chunker=must_not_chunk, read=read)
    assert plan.docs_unchanged == 2 and not plan.to_embed and not plan.to_retag and not plan.to_delete
    assert read == []  # no chunk ids read for a no-op


def test_plan_repairs_a_partially_written_doc_and_keeps_unreadable_docs():
    a = _doc("a", "a1|a2|a3")
    rows = chunk_rows(a, splitter(a.text), "m")
    keep = _doc("broken.md", "k1")
    # a run died after a's first chunk
    plan = _plan([a], rows[:1] + chunk_rows(keep, ["k1"], "m"), keep={"broken.md"})
    assert [r["text"] for r in plan.to_embed] == ["a2", "a3"]
    assert plan.to_delete == []  # broken.md could not be read this run: its chunks stay


def _plan_from_whole_ledger(docs, rows, keep):
    """The plan as the planner made it before the ledger was read per doc: every stored chunk id of every doc,
    compared in full (its rules, restated): the reference the per-doc read must agree with."""
    stored = store.chunks_by_doc(rows, {r["doc_id"] for r in rows})
    out = {"embed": set(), "retag": set(), "delete": set(), "unchanged": 0, "drifted": 0}
    for doc in docs:
        have = stored.get(doc.doc_id, {})
        if {v for v, _ in have.values()} == {doc.version} and {n for _, n in have.values()} == {len(have)}:
            out["unchanged"] += 1
            continue
        out["drifted"] += doc.version in {v for v, _ in have.values()}
        new = chunk_rows(doc, splitter(doc.text), "m")
        out["embed"] |= {r["chunk_id"] for r in new if r["chunk_id"] not in have}
        out["retag"] |= {r["chunk_id"] for r in new if have.get(r["chunk_id"], (doc.version, r["doc_chunks"]))
                         != (doc.version, r["doc_chunks"])}
        out["delete"] |= set(have) - {r["chunk_id"] for r in new}
    gone = {d for d in stored if d not in {doc.doc_id for doc in docs} | keep}
    out["delete"] |= {cid for d in gone for cid in stored[d]}
    return out


def test_plan_from_per_doc_states_equals_the_whole_ledger_plan_and_reads_only_what_it_needs():
    """A mix: unchanged, edited, new, removed, kept (unreadable), half-written, re-tagged by hand, and one doc
    whose rows carry two versions; the plan equals the whole-ledger one and reads chunk ids of 5 docs of 9."""
    old = {k: _doc(k, f"{k}1|{k}2|{k}3") for k in "abcdefgh"}
    rows = sum((chunk_rows(d, splitter(d.text), "m") for d in old.values()), [])
    rows = [r for r in rows if r["chunk_id"] != chunk_rows(old["f"], splitter(old["f"].text), "m")[2]["chunk_id"]]
    rows = [dict(r, doc_chunks=9) if r["doc_id"] == "g" and r["chunk_index"] == 0 else r for r in rows]
    h_edit = _doc("h", "h1|h2|h3-new")
    rows += [r for r in chunk_rows(h_edit, splitter(h_edit.text), "m") if r["text"] == "h3-new"]  # a killed re-tag
    corpus = [old["a"], old["b"], _doc("c", "c1|c2-new|c3"), _doc("new", "n1|n2"), old["f"], old["g"], h_edit]
    keep = {"e"}  # its file could not be read this run; "d" is gone
    read = []
    plan = _plan(corpus, rows, keep=keep, read=read)
    want = _plan_from_whole_ledger(corpus, rows, keep)
    assert sorted(read) == ["c", "d", "f", "g", "h"]
    assert {r["chunk_id"] for r in plan.to_embed} == want["embed"] and len(want["embed"]) == 4  # c2-new, n1, n2, f3
    assert {r["chunk_id"] for r in plan.to_retag} == want["retag"] and len(want["retag"]) == 5  # c1, c3, g1, h1, h2
    assert set(plan.to_delete) == want["delete"] and len(want["delete"]) == 5  # c2, d1-d3, h3
    assert plan.docs_unchanged == want["unchanged"] == 2
    # f, g, and h: a row of h's current version is stored, so its other rows count as drift (a killed run's)
    assert plan.drift.docs == want["drifted"] == 3
    assert (plan.docs_added, plan.docs_changed, plan.docs_removed) == (1, 1, 1)


def test_plan_refuses_a_changed_doc_whose_stored_chunks_were_not_read():
    a = _doc("a", "a1|a2")
    states = store.doc_states(chunk_rows(a, splitter(a.text), "m"))
    with pytest.raises(ValueError, match="stored chunks of a were not read"):
        plan_sync([_doc("a", "a1|a2-new")], states, set(), splitter, "m", {})
    with pytest.raises(ValueError, match="stored chunks of a were not read"):
        plan_sync([], states, set(), splitter, "m", {})  # removed: its chunk ids are what gets deleted


def test_doc_states_fold_rows_into_one_tuple_per_doc():
    rows = [{"doc_id": "a", "doc_version": "v1", "doc_chunks": 2}] * 2 + [
        {"doc_id": "b", "doc_version": "v1", "doc_chunks": 2}, {"doc_id": "b", "doc_version": "v2", "doc_chunks": 2},
        {"doc_id": "c", "doc_version": "v1", "doc_chunks": 3}, {"doc_id": "c", "doc_version": "v1", "doc_chunks": 2}]
    states = store.doc_states(rows)
    assert states == {"a": ("v1", 2, 2), "b": (None, 2, 2), "c": (None, 3, 2)}
    assert states["a"].is_current("v1") and not states["a"].is_current("v2") and not states["b"].is_current("v1")


def test_sources_skip_bad_files_with_reasons(tmp_path: Path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "ok.md").write_text("# Title\nSome text.")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "bin.txt").write_bytes(b"abc\x00def")
    (root / "big.txt").write_text("x" * 2000)
    (root / "page.html").write_text("<html><script>var x=1;</script><body><p>Hello</p><p>World</p></body></html>")
    (root / "recs.jsonl").write_text(
        json.dumps({"id": 1, "text": "one", "lang": "en"}) + "\n{broken\n"
        + json.dumps({"id": 1, "text": "one again"}) + "\n" + json.dumps({"id": 2}) + "\n"
    )
    outside = tmp_path / "secret.txt"
    outside.write_text("do not index")
    (root / "link.txt").symlink_to(outside)
    docs, skipped = load_documents(root, CorpusConfig(max_doc_bytes=1000))
    by_id = {d.doc_id: d for d in docs}
    assert set(by_id) == {"ok.md", "page.html", "recs.jsonl#1"}
    assert by_id["page.html"].text == "Hello\nWorld"
    assert by_id["recs.jsonl#1"].text == "one again"  # the later line wins, and is reported
    reasons = {s.doc_id: s.reason for s in skipped}
    assert reasons["empty.txt"] == "empty file"
    assert "not UTF-8" in reasons["latin1.txt"]
    assert "binary" in reasons["bin.txt"]
    assert "max_doc_bytes" in reasons["big.txt"]
    assert "outside the corpus root" in reasons["link.txt"]
    assert "malformed JSON" in reasons["recs.jsonl:2"]
    assert "needs a string/int 'id'" in reasons["recs.jsonl:4"]
    assert "recs.jsonl has 'id' '1' on lines 1 and 3; line 3 wins" in reasons["recs.jsonl#1"]
    assert all(s.source in {"empty.txt", "latin1.txt", "bin.txt", "big.txt", "link.txt", "recs.jsonl"} for s in skipped)


def test_missing_corpus_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass the corpus root"):
        load_documents(tmp_path / "nope", CorpusConfig())


def test_index_lock_lets_one_pass_at_a_time_and_the_next_one_waits(tmp_path):
    import threading

    from tunedex.infra.config import load_config
    from tunedex.workers.embed import index_lock

    cfg = load_config(None, [f"data_dir={tmp_path}"])
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        with index_lock(cfg, "docs__m"):
            order.append("second")
            entered.set()

    with index_lock(cfg, "docs__m"):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(1.0)  # held here: the second pass waits
        with index_lock(cfg, "other__m"):  # another collection is not held up
            order.append("other")
        order.append("first done")
    waiter.join(timeout=60)
    assert order == ["other", "first done", "second"]
    assert (tmp_path / "locks" / "docs__m.lock").exists()
