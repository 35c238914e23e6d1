"""Read a corpus directory into documents: text, Markdown, HTML (text extracted) and JSONL records.

A file that cannot be read (undecodable bytes, empty, binary, over the size limit, outside the
corpus root, a malformed JSONL line) is skipped with its reason; the run goes on, and the
documents that file had stored are kept.

Every document id is produced once, so no write batch can hold the same chunk id twice:
- a file reachable through several listed paths (a symlink inside the corpus, a symlinked
  directory named by an overlapping `corpus.include` glob) is read once, under its own path, or
  under the first path in sorted order when every path to it is a link; the other paths are
  reported as duplicates;
- a JSONL record id repeated in one file is a data error, reported with the file and every line
  number; the **last** line of that id wins (a JSONL file read as an append log: a later line is
  the newer record), so the result does not depend on anything but the file's content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from tunedex.infra.config import CorpusConfig
from tunedex.infra.ids import content_hash, doc_id_for_path


@dataclass(frozen=True)
class Document:
    doc_id: str
    version: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    doc_id: str  # the file's doc id, or `file.jsonl:LINE` / `file.jsonl#ID` for a record
    reason: str
    source: str  # the file it came from
    # "unreadable": nothing was read, so the documents `source` had stored are kept (a failed doc);
    # "duplicate": the same document reached twice; one copy was indexed, nothing is kept or failed.
    kind: str = "unreadable"


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    return "\n".join(parser.parts)


def list_files(root: Path, cfg: CorpusConfig) -> list[Path]:
    files = set()
    for pattern in cfg.include:
        files.update(p for p in root.glob(pattern) if p.is_file() or p.is_symlink())
    return sorted(p for p in files if not any(fnmatch(doc_id_for_path(root, p), ex) for ex in cfg.exclude))


def one_path_per_file(root: Path, paths: list[Path]) -> tuple[list[Path], list[Skipped]]:
    """Keep one path per real file: the path that is no link (or the first, sorted); report the others."""
    by_real: dict[Path, list[Path]] = {}
    for path in paths:  # sorted: the first path of each file is the first in sorted order
        by_real.setdefault(path.resolve(), []).append(path)
    keep, dropped = [], []
    for real, same in by_real.items():
        chosen = real if real in same else same[0]
        keep.append(chosen)
        name = doc_id_for_path(root, chosen)
        dropped.extend(
            Skipped(doc_id_for_path(root, p), f"same file as {name} (a symlink or an overlapping corpus.include "
                    f"glob); indexed once, as {name}", doc_id_for_path(root, p), kind="duplicate")
            for p in same if p != chosen
        )
    return sorted(keep), dropped


def load_documents(root: Path, cfg: CorpusConfig) -> tuple[list[Document], list[Skipped]]:
    if not root.is_dir():
        raise FileNotFoundError(f"corpus {root} is not a directory; pass the corpus root, e.g. demo-data/day1/corpus")
    root = root.resolve()
    docs: list[Document] = []
    paths, skipped = one_path_per_file(root, list_files(root, cfg))
    for path in paths:
        doc_id = doc_id_for_path(root, path)
        reason = _unreadable(root, path, cfg)
        if reason:
            skipped.append(Skipped(doc_id, reason, doc_id))
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            skipped.append(Skipped(doc_id, f"not UTF-8 (byte {exc.start}); re-save it as UTF-8", doc_id))
            continue
        if path.suffix == ".jsonl":
            records, bad = parse_jsonl(doc_id, text, cfg)
            docs.extend(records)
            skipped.extend(bad)
            continue
        if path.suffix in (".html", ".htm"):
            text = html_to_text(text)
        if not text.strip():
            skipped.append(Skipped(doc_id, "no text after extraction", doc_id))
            continue
        docs.append(Document(doc_id, content_hash(data), text, {"source": doc_id}))
    return docs, skipped


def _unreadable(root: Path, path: Path, cfg: CorpusConfig) -> str | None:
    real = path.resolve()
    if not real.is_relative_to(root):
        return "symlink points outside the corpus root; copy the file into the corpus instead"
    if not real.is_file():
        return f"broken symlink (its target {real.relative_to(root).as_posix()} is not a file); fix or delete the link"
    size = real.stat().st_size
    if size == 0:
        return "empty file"
    if size > cfg.max_doc_bytes:
        return f"{size} bytes is over corpus.max_doc_bytes={cfg.max_doc_bytes}; split it or raise the limit"
    with open(real, "rb") as fh:
        if b"\x00" in fh.read(8192):
            return "binary file (NUL bytes); only text, Markdown, HTML and JSONL are indexed"
    return None


def parse_jsonl(doc_id: str, text: str, cfg: CorpusConfig) -> tuple[list[Document], list[Skipped]]:
    """One document per record, id `file#record-id`. A repeated id: the last line wins, reported."""
    by_id: dict[str, Document] = {}
    lines_of: dict[str, list[int]] = {}
    bad: list[Skipped] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(Skipped(f"{doc_id}:{lineno}", f"malformed JSON ({exc.msg}); fix line {lineno}", doc_id))
            continue
        if not isinstance(record, dict):
            bad.append(Skipped(f"{doc_id}:{lineno}", f"line {lineno} is not a JSON object", doc_id))
            continue
        rid, body = record.get(cfg.jsonl_id_field), record.get(cfg.jsonl_text_field)
        if not isinstance(rid, (str, int)) or not isinstance(body, str) or not body.strip():
            bad.append(Skipped(
                f"{doc_id}:{lineno}",
                f"line {lineno} needs a string/int '{cfg.jsonl_id_field}' and a non-empty string "
                f"'{cfg.jsonl_text_field}' (see corpus.jsonl_id_field / jsonl_text_field)",
                doc_id,
            ))
            continue
        rec_id = f"{doc_id}#{rid}"
        meta = {k: v for k, v in record.items() if k not in (cfg.jsonl_id_field, cfg.jsonl_text_field)}
        meta["source"] = doc_id
        by_id[rec_id] = Document(rec_id, content_hash(json.dumps(record, sort_keys=True)), body, meta)
        lines_of.setdefault(rec_id, []).append(lineno)
    for rec_id, lines in lines_of.items():
        if len(lines) > 1:
            rid = rec_id.split("#", 1)[1]
            listed = ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"
            bad.append(Skipped(
                rec_id,
                f"duplicate id: {doc_id} has '{cfg.jsonl_id_field}' {rid!r} on lines {listed}; line {lines[-1]} wins "
                f"(the last line of an id is indexed); give each record its own id or delete the older lines",
                doc_id, kind="duplicate",
            ))
    return list(by_id.values()), bad
