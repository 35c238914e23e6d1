"""Index a corpus into Milvus incrementally: embed only what changed, delete what is gone.

The ledger is the collection itself: every row carries its doc id, doc version and the
number of chunks that doc version has. We chose the collection over a separate manifest
because a manifest can drift from the store (Milvus Lite can lose an acknowledged write on
SIGKILL); rows read back with Strong consistency cannot disagree with themselves. Each run:

1. reads the corpus and the ledger: streamed per doc (version, chunk count, rows), so a run over 1M
   unchanged chunks holds one small tuple per doc; chunk ids are read only for docs that changed,
   drifted or were removed, by filtered queries;
2. plans: a doc whose rows all carry its current version, `doc_chunks` of them, is unchanged
   and is not even chunked; every other doc is chunked, and its chunk ids (deterministic) are
   compared with the stored ones. A doc whose rows already include its current version but are
   not exactly its chunks did not change: its rows drifted (a killed run, a lost write, a hand
   edit), and the report counts the repair as drift: chunks missing, orphan rows no version of
   the doc produces, stale rows (a chunk of the doc tagged with another version or chunk count);
3. writes new chunks first (embed, upsert, flush per batch), re-tags chunks whose text did not
   change but whose doc version did (vectors reused, no model call), and only then deletes the
   chunks no document produces any more.

A kill at any point leaves rows a re-run repairs: nothing is deleted before its replacement is
stored, and documents that could not be read keep their stored chunks.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tunedex.infra import store
from tunedex.infra.config import TunedexConfig
from tunedex.infra.embedding import load_embedder, load_tokenizer
from tunedex.infra.ids import chunk_id, slug
from tunedex.workers.chunking import chunk_text
from tunedex.workers.sources import Document, load_documents

log = logging.getLogger(__name__)


@dataclass
class Drift:
    """Rows that disagreed with the corpus for a doc that did not change: what a run repaired."""

    docs: int = 0  # docs whose stored rows include their current version but are not exactly its chunks
    missing: int = 0  # chunks of such a doc with no row
    orphans: int = 0  # rows of such a doc that its current version does not produce
    stale: int = 0  # rows of such a doc with its chunk id but another doc_version or doc_chunks

    def __bool__(self) -> bool:
        return bool(self.docs)


@dataclass
class SyncPlan:
    to_embed: list[dict[str, Any]] = field(default_factory=list)  # rows without vectors
    to_retag: list[dict[str, Any]] = field(default_factory=list)  # rows whose vector is already stored
    to_delete: list[str] = field(default_factory=list)
    docs_added: int = 0
    docs_changed: int = 0
    docs_unchanged: int = 0
    docs_removed: int = 0
    drift: Drift = field(default_factory=Drift)


@dataclass
class IndexReport:
    collection: str
    docs_added: int
    docs_changed: int
    docs_removed: int
    docs_unchanged: int
    docs_failed: int
    chunks_embedded: int
    chunks_retagged: int
    chunks_deleted: int
    chunks_total: int
    seconds: float
    skipped: list[dict[str, str]]
    dry_run: bool = False
    drift: Drift = field(default_factory=Drift)

    @property
    def summary(self) -> str:
        rate = self.chunks_embedded / self.seconds if self.seconds else 0.0
        d = self.drift
        drift = f" | drift in {d.docs} docs: missing {d.missing} orphans {d.orphans} stale {d.stale}" if d else ""
        return (
            f"indexed {self.collection}: docs +{self.docs_added} ~{self.docs_changed} -{self.docs_removed} "
            f"={self.docs_unchanged} failed {self.docs_failed} | chunks embedded {self.chunks_embedded} "
            f"retagged {self.chunks_retagged} deleted {self.chunks_deleted} total {self.chunks_total}{drift} | "
            f"{self.seconds:.1f}s ({rate:.1f} chunks/s)" + (" [dry run]" if self.dry_run else "")
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def chunk_rows(doc: Document, chunks: list[str], model_id: str) -> list[dict[str, Any]]:
    """The rows of a doc's chunks. The id hashes a chunk's repeat number among identical texts in the doc,
    not its position: a chunk an edit did not touch keeps its id (and vector) when chunks before it come or go."""
    seen: Counter[str] = Counter()
    return [
        {
            "chunk_id": chunk_id(doc.doc_id, _repeat(seen, text), text, model_id),
            "doc_id": doc.doc_id,
            "doc_version": doc.version,
            "doc_chunks": len(chunks),
            "chunk_index": i,
            "text": text[: store.MAX_TEXT],
            "metadata": doc.metadata,
        }
        for i, text in enumerate(chunks)
    ]


def _repeat(seen: Counter[str], text: str) -> int:
    seen[text] += 1
    return seen[text] - 1


def docs_to_read(docs: list[Document], states: dict[str, store.DocState], keep_doc_ids: set[str]) -> list[str]:
    """The stored docs whose chunk rows the plan needs: changed or drifted (to compare chunk ids) and removed
    (to delete them). An unchanged doc's chunk ids are never read."""
    versions = {d.doc_id: d.version for d in docs}
    return [
        doc_id for doc_id, state in states.items()
        if (doc_id in versions and not state.is_current(versions[doc_id]))
        or (doc_id not in versions and doc_id not in keep_doc_ids)
    ]


def plan_sync(
    docs: list[Document],
    states: dict[str, store.DocState],
    keep_doc_ids: set[str],
    chunker: Callable[[str], list[str]],
    model_id: str,
    stored_chunks: dict[str, dict[str, tuple[str, int]]] | None = None,
) -> SyncPlan:
    """Compare the corpus with the ledger. Pure: no model, no store.

    `states` is the ledger per doc (`store.read_doc_states`); `stored_chunks` holds chunk_id -> (doc_version,
    doc_chunks) of exactly the docs `docs_to_read` names (`store.read_doc_chunks`). Doc ids must be unique
    (`load_documents` makes them so): a doc listed twice is refused here rather than planned twice.
    """
    stored_chunks = stored_chunks or {}
    plan = SyncPlan()
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise ValueError(f"document {doc.doc_id} is listed twice; each doc id must be planned once")
        seen.add(doc.doc_id)
        state = states.get(doc.doc_id)
        if state is not None and state.is_current(doc.version):
            plan.docs_unchanged += 1
            continue
        stored = _read_chunks(stored_chunks, doc.doc_id, state)
        versions = {v for v, _ in stored.values()}
        drifted = doc.version in versions  # indexed at this version before: the rows drifted, the doc did not change
        if drifted:
            plan.drift.docs += 1
        elif stored:
            plan.docs_changed += 1
        else:
            plan.docs_added += 1
        rows = chunk_rows(doc, chunker(doc.text), model_id)
        expected = {r["chunk_id"] for r in rows}
        for row in rows:
            have = stored.get(row["chunk_id"])
            if have is None:
                plan.to_embed.append(row)
                plan.drift.missing += drifted
            elif have != (doc.version, row["doc_chunks"]):
                plan.to_retag.append(row)
                plan.drift.stale += drifted
        extra = [cid for cid in stored if cid not in expected]
        plan.to_delete.extend(extra)
        plan.drift.orphans += len(extra) if drifted else 0
    for doc_id, state in states.items():
        if doc_id not in seen and doc_id not in keep_doc_ids:
            plan.docs_removed += 1
            plan.to_delete.extend(_read_chunks(stored_chunks, doc_id, state))
    return plan


def _read_chunks(
    stored_chunks: dict[str, dict[str, tuple[str, int]]], doc_id: str, state: store.DocState | None
) -> dict[str, tuple[str, int]]:
    if state is None:
        return {}
    if doc_id not in stored_chunks:  # planning without them would leave its old chunks behind for good
        raise ValueError(f"the stored chunks of {doc_id} were not read; "
                         "pass store.read_doc_chunks(..., docs_to_read(...)) as stored_chunks")
    return stored_chunks[doc_id]


_EMBEDDERS: dict[str, Any] = {}


def vector_batches(texts: dict[str, str], cfg: TunedexConfig) -> Iterator[dict[str, list[float]]]:
    """{chunk_id: vector} batches: in this process, or on a Ray Data replica pool (`embedding.replicas`)."""
    size = cfg.milvus.write_batch_size
    if cfg.embedding.replicas:
        from tunedex.workers.embed_pipeline import embed_with_ray

        yield from embed_with_ray(texts, cfg, size)
        return
    key = cfg.embedding.model_dump_json()
    if key not in _EMBEDDERS:  # kept for the process: a long-lived indexer (`tunedex watch`, a flow worker) loads it once
        _EMBEDDERS[key] = load_embedder(cfg.embedding)
    embedder = _EMBEDDERS[key]
    ordered = sorted(texts, key=lambda cid: len(texts[cid]))  # similar lengths share a batch: less padding
    for start in range(0, len(ordered), size):
        ids = ordered[start : start + size]
        yield dict(zip(ids, embedder.embed([texts[cid] for cid in ids])))


@dataclass
class Written:
    embedded: int  # rows embedded, the re-tags whose stored vector had vanished included
    retagged: int  # rows re-tagged with their stored vector
    deleted: int


def write_plan(client: Any, cfg: TunedexConfig, name: str, plan: SyncPlan) -> Written:
    """New rows first, then re-tags, then deletes: a kill anywhere leaves only repairable state.

    The collection is created on the first write (its dim is the first vector's). A re-tag whose
    stored vector vanished meanwhile (a lost write) is embedded instead, and counted so.
    """
    rows = {r["chunk_id"]: r for r in plan.to_embed}  # one row per chunk id, however the plan listed them
    progress = Progress(total_chunks=len(rows), total_docs=len({r["doc_id"] for r in rows.values()}))
    for i, vectors in enumerate(vector_batches({cid: r["text"] for cid, r in rows.items()}, cfg) if rows else ()):
        if i == 0:  # one round trip, not one per batch
            store.ensure_collection(client, cfg.milvus, name, len(next(iter(vectors.values()))))
        store.upsert_rows(client, name, [{**rows[cid], "dense": vec} for cid, vec in vectors.items()])
        progress.update([rows[cid]["doc_id"] for cid in vectors])
    written = Written(embedded=len(rows), retagged=0, deleted=0)
    size = cfg.milvus.write_batch_size
    retag = list({r["chunk_id"]: r for r in plan.to_retag}.values())
    for start in range(0, len(retag), size):
        batch = retag[start : start + size]
        vectors = store.fetch_vectors(client, name, [r["chunk_id"] for r in batch])
        lost = {r["chunk_id"]: r["text"] for r in batch if r["chunk_id"] not in vectors}
        for more in vector_batches(lost, cfg) if lost else ():
            vectors.update(more)
        store.upsert_rows(client, name, [{**r, "dense": vectors[r["chunk_id"]]} for r in batch])
        written.retagged += len(batch) - len(lost)
        written.embedded += len(lost)
    written.deleted = store.delete_ids(client, name, sorted(set(plan.to_delete)))
    return written


class Progress:
    """Fixed-format progress lines, at most one every few seconds: chunks/s, docs/s, ETA."""

    def __init__(self, total_chunks: int, total_docs: int, every_s: float = 5.0):
        self.total_chunks, self.total_docs, self.every_s = total_chunks, total_docs, every_s
        self.started = self.last = time.monotonic()
        self.chunks = 0
        self.docs_seen: set[str] = set()

    def update(self, doc_ids: list[str]) -> None:
        self.chunks += len(doc_ids)
        self.docs_seen.update(doc_ids)
        now = time.monotonic()
        if now - self.last < self.every_s and self.chunks < self.total_chunks:
            return
        self.last = now
        elapsed = now - self.started
        rate = self.chunks / elapsed if elapsed else 0.0
        eta = (self.total_chunks - self.chunks) / rate if rate else 0.0
        log.info("embedded %d/%d chunks (%d/%d docs) | %.1f chunks/s | %.1f docs/s | elapsed %.0fs | eta %.0fs",
                 self.chunks, self.total_chunks, len(self.docs_seen), self.total_docs, rate,
                 len(self.docs_seen) / elapsed if elapsed else 0.0, elapsed, eta)


def retire_collections(client: Any, cfg: TunedexConfig, live: str) -> list[str]:
    """Drop collections of past embedding models beyond `milvus.keep_collections`, never one a release names."""
    from tunedex.infra.registry import list_releases

    in_use = {r.collection for r in list_releases(cfg.registry_dir)} | {live}
    older = [name for _, name in store.model_collections(client, cfg.milvus) if name != live]
    retired = [name for name in older[: max(0, len(older) - (cfg.milvus.keep_collections - 1))] if name not in in_use]
    for name in retired:
        client.drop_collection(name)
        log.info("dropped collection %s (milvus.keep_collections=%d)", name, cfg.milvus.keep_collections)
    return retired


def index_corpus(cfg: TunedexConfig, root: Path, dry_run: bool = False, client: Any = None) -> IndexReport:
    """One incremental run. `client`: a MilvusClient to write through (left open); else one of its own.
    Runs under the collection's index lock: `tunedex index`, the nightly flow and `tunedex watch` never write
    one collection at once (a dry run reads only and takes no lock)."""
    name = store.collection_name(cfg.milvus, slug(cfg.embedding.model))
    with nullcontext() if dry_run else index_lock(cfg, name):
        return _index_pass(cfg, root, name, dry_run, client)


@contextmanager
def index_lock(cfg: TunedexConfig, name: str) -> Iterator[None]:
    """An exclusive lock on `<data_dir>/locks/<collection>.lock`, waited for when another pass holds it. The
    kernel drops it when its holder exits, killed included, so a crashed pass never leaves it behind."""
    path = cfg.data_dir / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another index pass on %s is running (%s); waiting for it", name, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def chunker(cfg: TunedexConfig) -> Callable[[str], list[str]]:
    """`chunk_text` with the embedding model's tokenizer, loaded when the first document needs chunking: a run
    over an unchanged corpus loads no tokenizer (and so no torch: most of a no-op `tunedex index`'s time)."""
    @functools.cache
    def setup() -> tuple[Any, int, int]:
        tokenizer, max_tokens = load_tokenizer(cfg.embedding)
        size = min(cfg.chunking.chunk_size, max_tokens)
        return tokenizer, size, min(cfg.chunking.chunk_overlap, size - 1)

    def chunk(text: str) -> list[str]:
        tokenizer, size, overlap = setup()
        return chunk_text(text, tokenizer, size, overlap)

    return chunk


def _index_pass(cfg: TunedexConfig, root: Path, name: str, dry_run: bool, client: Any) -> IndexReport:
    started = time.monotonic()
    docs, skipped = load_documents(root, cfg.corpus)
    own_client = client is None
    client = store.connect(cfg.milvus) if own_client else client
    exists = client.has_collection(name)
    if exists:
        client.load_collection(name)
    states = store.read_doc_states(client, name) if exists else {}
    loaded = {d.doc_id for d in docs}
    unreadable = [s for s in skipped if s.kind == "unreadable" and s.doc_id not in loaded]
    # A file that could not be read (wholly, or one JSONL line) keeps every document it had stored.
    failed_files = {s.source for s in unreadable}
    keep = {doc_id for doc_id in states if doc_id.split("#")[0] in failed_files}
    needed = docs_to_read(docs, states, keep)
    stored = store.read_doc_chunks(client, name, states, needed) if needed else {}
    plan = plan_sync(docs, states, keep, chunker(cfg), cfg.embedding.model, stored)
    if plan.drift:
        log.warning("the store drifted from the corpus in %d unchanged docs (missing %d, orphans %d, stale %d); "
                    "repairing", plan.drift.docs, plan.drift.missing, plan.drift.orphans, plan.drift.stale)
    written = Written(0, 0, 0)
    if not dry_run:
        written = write_plan(client, cfg, name, plan)
        if client.has_collection(name):
            from tunedex.infra.registry import point_live

            point_live(cfg, client, name)
            retire_collections(client, cfg, name)
    report = IndexReport(
        collection=name,
        docs_added=plan.docs_added,
        docs_changed=plan.docs_changed,
        docs_removed=plan.docs_removed,
        docs_unchanged=plan.docs_unchanged,
        docs_failed=len({s.doc_id for s in unreadable}),
        chunks_embedded=written.embedded,
        chunks_retagged=written.retagged,
        chunks_deleted=written.deleted,
        chunks_total=sum(st.rows for st in states.values()) if dry_run or not client.has_collection(name)
        else store.count_rows(client, name),
        seconds=round(time.monotonic() - started, 3),
        skipped=[asdict(s) for s in skipped],
        dry_run=dry_run,
        drift=plan.drift,
    )
    if own_client:
        client.close()
    return report
