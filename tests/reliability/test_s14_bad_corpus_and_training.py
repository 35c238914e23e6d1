"""S14, the corpus and training side: bad files are reported skips or clear errors, and lose nothing stored."""

import json

import pytest

from tunedex.infra import store
from tunedex.infra.config import load_config
from tunedex.workers.embed import index_corpus
from tunedex.workers.finetune import FinetuneError
from tunedex.workers.finetune import main as finetune

pytestmark = [pytest.mark.slow, pytest.mark.scenario(
    "S14", "16 bad corpus inputs (empty, non-UTF-8, binary, oversized, malformed JSONL lines, a symlink out, a good "
           "doc turned unreadable) and 15 bad training files")]

GOOD = {
    "a.md": "# Returns\nItems can be returned within 30 days of delivery.",
    "b.txt": "Shipping is free on orders over $50.",
    "records.jsonl": "\n".join(json.dumps({"id": i, "text": f"Record {i} about warranty terms."}) for i in range(3)),
}
BAD_FILES = {
    "empty.md": b"",
    "blank.txt": b"   \n\n  ",
    "latin1.txt": "caf\xe9 cr\xe8me".encode("latin-1"),
    "binary.txt": b"PK\x03\x04\x00\x00binary",
    "huge.txt": b"word " * 60_000,
    "script-only.html": b"<html><script>alert(1)</script></html>",
}
BAD_LINES = ["{broken", json.dumps([1, 2]), json.dumps({"text": "no id"}), json.dumps({"id": [1], "text": "list id"}),
             json.dumps({"id": 7, "text": 42}), json.dumps({"id": 8}), '{"id": 9, "text": "unterminated']


def rows_of(cfg, name):
    client = store.connect(cfg.milvus)
    try:
        return {(r["chunk_id"], r["doc_id"], r["doc_version"]) for r in store.iter_rows(client, name, store.LEDGER_FIELDS)}
    finally:
        client.close()


def test_bad_corpus_files_are_reported_and_nothing_stored_is_lost(stack, tmp_path, record_property):
    path, _ = stack
    cfg = load_config(path, ["milvus.collection=s14", "corpus.max_doc_bytes=100000"])
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in GOOD.items():
        (root / name).write_text(text, encoding="utf-8")
    first = index_corpus(cfg, root)
    stored = rows_of(cfg, first.collection)
    assert first.docs_added == 5 and len(stored) == first.chunks_total

    for name, data in BAD_FILES.items():
        (root / name).write_bytes(data)
    (root / "more.jsonl").write_text("\n".join(BAD_LINES) + "\n", encoding="utf-8")
    (root / "latin1.jsonl").write_bytes(b'{"id": 1, "text": "caf\xe9"}\n')  # a file that is not UTF-8: skipped whole
    (tmp_path / "secret.txt").write_text("outside the corpus root")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "b.txt").write_bytes(b"\xff\xfe was good, now unreadable")  # its stored chunks must stay
    report = index_corpus(cfg, root)
    skipped = {s["doc_id"]: s["reason"] for s in report.skipped}
    expected = [*BAD_FILES, "link.txt", "b.txt", "latin1.jsonl"]
    missing = [name for name in expected if name not in skipped]
    assert not missing, (missing, skipped)
    bad_lines = [s for s in report.skipped if s["source"] == "more.jsonl"]
    assert len(bad_lines) == len(BAD_LINES), bad_lines  # every bad line, reported by its number
    expected += [s["doc_id"] for s in bad_lines]
    assert all(len(reason) >= 8 for reason in skipped.values()), skipped  # a reason a person can act on
    assert rows_of(cfg, first.collection) == stored, "a bad input cost stored rows"
    assert report.chunks_embedded == 0 and report.chunks_deleted == 0
    record_property("held", f"{len(expected)} bad corpus inputs: each a reported skip with its reason; the "
                            f"{len(stored)} stored rows unchanged (also those of the doc that became unreadable)")


def training_files(tmp_path):
    def msgs(*turns):
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    good = json.dumps(msgs(("user", "hi"), ("assistant", "hello")))
    lines = {
        "empty": "", "blank": "  \n \n", "broken": "{oops", "array": "[1, 2]",
        "messages-not-list": json.dumps({"messages": "hi"}),
        "no-content": json.dumps({"messages": [{"role": "user"}]}),
        "unknown-role": json.dumps(msgs(("user", "hi"), ("wizard", "hello"))),
        "no-assistant": json.dumps(msgs(("system", "s"), ("user", "hi"))),
        "empty-assistant": json.dumps(msgs(("user", "hi"), ("assistant", "  "))),
        "prompt-only": json.dumps({"prompt": "hi"}),
        "empty-completion": json.dumps({"prompt": "hi", "completion": ""}),
        "completion-number": json.dumps({"prompt": "hi", "completion": 5}),
        "empty-text": json.dumps({"text": ""}),
    }
    files = {}
    for name, line in lines.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(f"{good}\n{line}\n" if line.strip() else line)
    files["non-utf8"] = tmp_path / "non-utf8.jsonl"
    files["non-utf8"].write_bytes(good.encode() + b"\n\xff\xfe\n")
    files["directory"] = tmp_path / "dir.jsonl"
    files["directory"].mkdir()
    return files


def test_bad_training_files_fail_before_any_training_naming_the_line(stack, tmp_path, record_property):
    path, _ = stack
    files = training_files(tmp_path)
    for name, file in files.items():
        cfg = load_config(path, [f"finetune.train_file={file}", f"finetune.ray.run_name=s14-{name}"])
        with pytest.raises(FinetuneError) as exc:
            finetune(cfg)
        msg = str(exc.value)
        assert str(file) in msg, (name, msg)
        if name not in ("empty", "blank", "directory"):
            assert "line 2" in msg, (name, msg)
        assert not (cfg.data_dir / "ray_results" / f"s14-{name}").exists()  # nothing started
    record_property("held", f"{len(files)} bad training files: each refused before training with the file and its "
                            "line number (or why the file is unusable)")
