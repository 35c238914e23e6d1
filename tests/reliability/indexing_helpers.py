"""What the indexing scenarios (S1-S4) share: a synthetic corpus and its changes, the rows it must
produce (computed from the corpus apart from the indexer's writer), the rows stored, and a Milvus
Lite server of the test's own."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from tunedex.infra import services, store
from tunedex.infra.config import TunedexConfig, load_config
from tunedex.infra.embedding import load_tokenizer
from tunedex.infra.ids import chunk_id
from tunedex.infra.services import free_port
from tunedex.workers.sources import load_documents

WORDS = ("kettle lamp chair desk cable warranty refund shipping battery screen speaker mouse keyboard "
         "stock price order invoice repair replace delivery return colour size model series").split()
MODEL_SLUG = "all_minilm_l6_v2"
ALL_FIELDS = ["chunk_id", "doc_id", "doc_version", "doc_chunks", "chunk_index", "text", "metadata", "dense"]


def doc_text(rng: random.Random, i: int | str) -> str:
    """One to three chunks of 96 tokens; `sku-<i>` makes the doc findable by BM25."""
    return f"# Doc {i} sku-{i}\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 260)))


def write_corpus(root: Path, rng: random.Random, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:04d}.md").write_text(doc_text(rng, f"{i:04d}"))


def mutate(root: Path, rng: random.Random, fraction: float, tag: str) -> dict[str, list[str]]:
    """Change, delete and add `fraction` of the docs each (at least one); returns the doc ids of each."""
    docs = sorted(root.glob("*.md"))
    k = max(1, round(len(docs) * fraction))
    picked = rng.sample(docs, 2 * k)
    for path in picked[:k]:  # the last chunk changes; earlier chunks keep their text (re-tagged, not re-embedded)
        path.write_text(path.read_text() + f" changed {tag} " + rng.choice(WORDS))
    for path in picked[k:]:
        path.unlink()
    added = [root / f"new-{tag}-{i}.md" for i in range(k)]
    for path in added:
        path.write_text(doc_text(rng, f"{tag}-{path.stem}"))
    return {"changed": [p.name for p in picked[:k]], "deleted": [p.name for p in picked[k:]],
            "added": [p.name for p in added]}


def write_config(tmp_path: Path, collection: str, **sections: dict) -> Path:
    """A config of the test's own: its data dir, a free Milvus port, small write batches; `sections` added."""
    path = tmp_path / f"{collection}.yaml"
    raw = {
        "data_dir": str(tmp_path / "data"),
        "milvus": {"uri": f"http://127.0.0.1:{free_port()}", "collection": collection, "write_batch_size": 16},
        "chunking": {"chunk_size": 96, "chunk_overlap": 16},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(raw))
    return path


@contextmanager
def milvus_server(config: Path) -> Iterator[TunedexConfig]:
    """A Milvus Lite server for this test only, stopped at the end."""
    cfg = load_config(config)
    services.start_milvus(cfg)
    try:
        yield cfg
    finally:
        services.stop_milvus(cfg)


def kill_milvus_and_restart(cfg: TunedexConfig) -> None:
    """SIGKILL the Lite server (what it had not persisted is lost) and start it again on the same data."""
    pid = int((cfg.run_dir / "milvus.pid").read_text())
    services.psutil.Process(pid).kill()
    services.psutil.Process(pid).wait(10)
    services.start_milvus(cfg)


def collection(cfg: TunedexConfig) -> str:
    return store.collection_name(cfg.milvus, MODEL_SLUG)


def connect_loaded(cfg: TunedexConfig) -> Any:
    """A client with the collection loaded (a restarted Lite server holds every collection released)."""
    client = store.connect(cfg.milvus)
    if client.has_collection(collection(cfg)):
        client.load_collection(collection(cfg))
    return client


def expected_rows(root: Path, cfg: TunedexConfig) -> set[tuple[str, str, str]]:
    """(chunk_id, doc_id, doc_version) the collection must hold: from the corpus, without the indexer's writer."""
    from tunedex.workers.chunking import chunk_text

    tok, _ = load_tokenizer(cfg.embedding)
    docs, _ = load_documents(root, cfg.corpus)
    out = set()
    for d in docs:
        chunks = chunk_text(d.text, tok, cfg.chunking.chunk_size, cfg.chunking.chunk_overlap)
        # the id hashes a chunk's repeat number among identical texts of its doc, not its position
        out |= {(chunk_id(d.doc_id, chunks[:i].count(t), t, cfg.embedding.model), d.doc_id, d.version)
                for i, t in enumerate(chunks)}
    return out


def stored_rows(client: Any, name: str, fields: list[str] | None = None) -> list[tuple]:
    """Every stored row as a tuple of `fields` (default chunk_id, doc_id, doc_version), read Strong."""
    fields = fields or ["chunk_id", "doc_id", "doc_version"]
    return [tuple(r[f] for f in fields) for r in store.iter_rows(client, name, fields)]


def check_equals_corpus(cfg: TunedexConfig, corpus: Path) -> dict[str, int]:
    """Stored rows against the expected set; returns the figures and asserts 0 duplicate, missing, stale."""
    client = connect_loaded(cfg)
    try:
        rows, count = stored_rows(client, collection(cfg)), store.count_rows(client, collection(cfg))
    finally:
        client.close()
    expected = expected_rows(corpus, cfg)
    figures = {"rows": count, "duplicates": count - len(set(rows)), "missing": len(expected - set(rows)),
               "stale": len(set(rows) - expected)}
    assert (figures["duplicates"], figures["missing"], figures["stale"]) == (0, 0, 0), figures
    assert count == len(expected)
    return figures


def index_cmd(config: Path, corpus: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "tunedex"), "index", str(corpus), "-c", str(config), "--json"]


def run_index(config: Path, corpus: Path, timeout: float = 600) -> tuple[dict, str]:
    """`tunedex index --json` in its own process, as a user runs it: (the report, stderr)."""
    proc = subprocess.run(index_cmd(config, corpus), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"tunedex index exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{"):]), proc.stderr
