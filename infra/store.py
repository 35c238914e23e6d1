"""The Milvus store: schema, writes, the ledger reads, hybrid search.

Everything reaches Milvus through `milvus.uri`, so the local Milvus Lite server and a
Milvus cluster are one code path. Writes are upserts only (a server's plain insert with
an existing key adds a second row; Lite's behaves as upsert), deduplicated by primary key
within each batch (Milvus >= 2.6 rejects in-batch duplicates), and flushed before a batch
counts as done (Lite's WAL reaches disk at flush).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, NamedTuple

import grpc
from pymilvus import AnnSearchRequest, DataType, Function, FunctionType, MilvusClient, RRFRanker, WeightedRanker

from tunedex.infra.config import MilvusConfig
from tunedex.infra.errors import TunedexError

log = logging.getLogger(__name__)

MAX_TEXT = 65_535
LEDGER_FIELDS = ["chunk_id", "doc_id", "doc_version", "doc_chunks"]
# rows per query_iterator page when reading the ledger: pymilvus's largest; 1M rows read in half the time of 5,000
# (bench/README.md)
LEDGER_PAGE = 16384


class StoreUnavailable(TunedexError, RuntimeError):
    """Milvus cannot be reached (transient: a retry may succeed)."""


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    doc_version: str
    score: float
    text: str
    metadata: dict[str, Any]


# pymilvus pings every 10 s; the Milvus Lite server (Python gRPC, default policy) allows one ping per 5 minutes
# without data and answers more with GOAWAY "Too many pings", which failed the next connect of a long-lived
# process (seen in the S1/S2 tests). On loopback no connection needs keepalive, so the client sends none.
LOOPBACK_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 2**31 - 1, "grpc.keepalive_permit_without_calls": False}


def connect(cfg: MilvusConfig, timeout: float = 10.0) -> MilvusClient:
    options = {"grpc_options": LOOPBACK_GRPC_OPTIONS} if cfg.is_loopback else {}
    try:
        return MilvusClient(uri=cfg.uri, token=cfg.token, timeout=timeout, **options)
    except Exception as exc:  # pymilvus raises MilvusException subclasses with varying names
        raise StoreUnavailable(
            f"cannot reach Milvus at {cfg.uri} ({exc.__class__.__name__}); "
            "start it with `tunedex up` or fix `milvus.uri`"
        ) from exc


def collection_name(cfg: MilvusConfig, model_slug: str) -> str:
    """One collection per embedding model: vectors of two models never mix."""
    return f"{cfg.collection}__{model_slug}"


def live_alias(cfg: MilvusConfig) -> str:
    return f"{cfg.collection}_live"


def ensure_collection(client: MilvusClient, cfg: MilvusConfig, name: str, dim: int) -> None:
    if client.has_collection(name):
        return
    # The description records when: Milvus Lite reports no creation time, and retention needs one.
    created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=f"tunedex created={created}")
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=2048)
    schema.add_field("doc_version", DataType.VARCHAR, max_length=64)
    schema.add_field("doc_chunks", DataType.INT64)  # chunks the doc version has: tells a complete doc from a partial one
    schema.add_field("chunk_index", DataType.INT64)
    # english stems and drops stop words: "return an item" finds "items can be returned" (standard does not)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True,
                     analyzer_params={"type": cfg.analyzer})
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(
        Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"], output_field_names=["sparse"])
    )
    index = client.prepare_index_params()
    index.add_index("dense", index_type=cfg.index_type, metric_type="COSINE", params=cfg.dense_index_params)
    index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(name, schema=schema, index_params=index, consistency_level=cfg.consistency_level)
    client.load_collection(name)
    log.info("created collection %s (dim %d, %s)", name, dim, cfg.index_type)


def dedupe_by_pk(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last row of each chunk id: the same rule on every backend."""
    return list({row["chunk_id"]: row for row in rows}.values())


def upsert_rows(client: MilvusClient, name: str, rows: list[dict[str, Any]]) -> int:
    """The only write path: upsert (never insert) of a batch without repeated keys, then flush."""
    rows = dedupe_by_pk(rows)
    if rows:
        client.upsert(name, rows)
        client.flush(name)
    return len(rows)


def delete_ids(client: MilvusClient, name: str, ids: list[str], batch: int = 1000) -> int:
    for start in range(0, len(ids), batch):
        client.delete(name, ids=ids[start : start + batch])
    if ids:
        client.flush(name)
    return len(ids)


def iter_rows(
    client: MilvusClient, name: str, fields: list[str], batch: int = 2000, filter: str = ""
) -> Iterator[dict[str, Any]]:
    """Every row of the collection that matches `filter` (Strong consistency), in pages."""
    it = client.query_iterator(name, batch_size=batch, filter=filter, output_fields=fields, consistency_level="Strong")
    try:
        while page := it.next():
            yield from page
    finally:
        it.close()


class DocState(NamedTuple):
    """What the ledger says of one doc, summed over its rows: one small tuple per doc, not one per chunk."""

    version: str | None  # the version all its rows carry; None when they disagree on version or doc_chunks
    chunks: int  # doc_chunks of its rows (of the first one read, when they disagree)
    rows: int

    def is_current(self, version: str) -> bool:
        """Its rows are exactly one whole index of `version`: nothing to embed, re-tag or delete."""
        return self.version == version and self.chunks == self.rows


def doc_states(rows: Iterable[dict[str, Any]]) -> dict[str, DocState]:
    """doc_id -> DocState from ledger rows, folded as they stream by."""
    states: dict[str, DocState] = {}
    for r in rows:
        doc_id, version, n = r["doc_id"], r["doc_version"], int(r["doc_chunks"])
        s = states.get(doc_id)
        if s is None:
            states[doc_id] = DocState(version, n, 1)
        else:
            same = s.version == version and s.chunks == n
            states[doc_id] = DocState(s.version if same else None, s.chunks, s.rows + 1)
    return states


def read_doc_states(client: MilvusClient, name: str, page: int = LEDGER_PAGE) -> dict[str, DocState]:
    """The ledger, per document: streamed from the collection with `query_iterator`, chunk ids not kept."""
    return doc_states(iter_rows(client, name, ["doc_id", "doc_version", "doc_chunks"], batch=page))


def chunks_by_doc(rows: Iterable[dict[str, Any]], doc_ids: Iterable[str]) -> dict[str, dict[str, tuple[str, int]]]:
    """doc_id -> {chunk_id: (doc_version, doc_chunks)} for the docs in `doc_ids` (others' rows are skipped)."""
    out: dict[str, dict[str, tuple[str, int]]] = {d: {} for d in doc_ids}
    for r in rows:
        if r["doc_id"] in out:
            out[r["doc_id"]][r["chunk_id"]] = (r["doc_version"], int(r["doc_chunks"]))
    return out


def read_doc_chunks(
    client: MilvusClient, name: str, states: dict[str, DocState], doc_ids: list[str], batch: int = 200
) -> dict[str, dict[str, tuple[str, int]]]:
    """The stored chunks of `doc_ids` only, by `doc_id in [...]` queries of `batch` docs.

    A doc whose rows came back fewer than its state counts (an id the expression cannot spell: control
    characters are not matched by milvus-lite 2.5 nor parsed by Milvus Lite 3) is read again by a full
    scan, so a plan never misses a stored chunk it must replace or delete.
    """
    out: dict[str, dict[str, tuple[str, int]]] = {}
    spellable = [d for d in doc_ids if d.isprintable()]
    for start in range(0, len(spellable), batch):
        ids = spellable[start : start + batch]
        expr = "doc_id in [" + ", ".join(_string_literal(d) for d in ids) + "]"
        out.update(chunks_by_doc(iter_rows(client, name, LEDGER_FIELDS, LEDGER_PAGE, expr), ids))
    short = [d for d in doc_ids if len(out.get(d, ())) < states[d].rows]
    if short:
        log.info("reading the chunks of %d docs by a full scan (ids a filter cannot spell)", len(short))
        out.update(chunks_by_doc(iter_rows(client, name, LEDGER_FIELDS, LEDGER_PAGE), short))
    return out


def _string_literal(text: str) -> str:
    """A double-quoted Milvus expression string (printable text: both embedded engines read these two escapes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fetch_vectors(client: MilvusClient, name: str, ids: list[str], batch: int = 500) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for start in range(0, len(ids), batch):
        for r in client.get(name, ids=ids[start : start + batch], output_fields=["chunk_id", "dense"]):
            out[r["chunk_id"]] = list(r["dense"])
    return out


def count_rows(client: MilvusClient, name: str) -> int:
    res = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(res[0]["count(*)"])


def model_collections(client: MilvusClient, cfg: MilvusConfig) -> list[tuple[str, str]]:
    """(created, name) of every collection under the `milvus.collection` prefix, oldest first."""
    out = []
    for name in client.list_collections():
        if name.startswith(f"{cfg.collection}__"):
            desc = client.describe_collection(name).get("description", "")
            out.append((desc.partition("created=")[2], name))
    return sorted(out)


def has_aliases(client: MilvusClient) -> bool:
    """Whether the engine implements aliases: milvus-lite 2.5 answers UNIMPLEMENTED (the registry says what is live)."""
    rpc_log = logging.getLogger("pymilvus.decorators")  # it logs the expected UNIMPLEMENTED as an ERROR
    level = rpc_log.level
    rpc_log.setLevel(logging.CRITICAL)
    try:
        client.list_aliases()
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return False
    finally:
        rpc_log.setLevel(level)
    return True


def point_alias(client: MilvusClient, alias: str, name: str) -> None:
    """Move `alias` to `name` (create it if new)."""
    if alias not in client.list_aliases().get("aliases", []):
        client.create_alias(name, alias)
    elif client.describe_alias(alias)["collection_name"] != name:
        client.alter_alias(name, alias)


def resolve_alias(client: MilvusClient, alias: str) -> str | None:
    if alias not in client.list_aliases().get("aliases", []):
        return None
    return client.describe_alias(alias)["collection_name"]


def alias_target(client: MilvusClient, alias: str) -> str | None:
    """The collection `alias` names, or None where it does not exist or the engine has no aliases."""
    return resolve_alias(client, alias) if has_aliases(client) else None


def hybrid_search(
    client: MilvusClient,
    cfg: MilvusConfig,
    name: str,
    vector: list[float],
    query: str,
    top_k: int,
    filter: str = "",
) -> list[Hit]:
    """Dense + BM25, fused by reciprocal rank (`rrf`) or by weighted scores; `filter` is a Milvus expression.

    Reads at `milvus.consistency_level`, passed on every call: a collection's own default is fixed
    when it is created, so a later change of the setting would otherwise not reach the serving path.
    """
    fields = ["doc_id", "doc_version", "text", "metadata"]
    dense = AnnSearchRequest(data=[vector], anns_field="dense", param=cfg.dense_search_params, limit=top_k, expr=filter or None)
    sparse = AnnSearchRequest(data=[query], anns_field="sparse", param={}, limit=top_k, expr=filter or None)
    ranker = RRFRanker(60) if cfg.ranker == "rrf" else WeightedRanker(*cfg.ranker_weights)
    res = client.hybrid_search(name, [dense, sparse], ranker=ranker, limit=top_k, output_fields=fields,
                               consistency_level=cfg.consistency_level)
    return [
        Hit(
            chunk_id=h["id"] if "id" in h else h["chunk_id"],
            doc_id=h["entity"]["doc_id"],
            doc_version=h["entity"]["doc_version"],
            score=float(h["distance"]),
            text=h["entity"]["text"],
            metadata=h["entity"].get("metadata") or {},
        )
        for h in res[0]
    ]
