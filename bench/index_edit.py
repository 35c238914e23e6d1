"""Edit-local chunks on a real corpus: one edited sentence re-embeds about one chunk; no-op and 1% runs from the CLI.

    python bench/index_edit.py       # ~8 MB of docs from site-packages; ~5 min on 2 cores; writes bench/results/index_edit.json
    python bench/index_edit.py --max-mb 16   # more of the machine's manuals (~25 MB in all); ~10 min

Targets (issue 16): chunks embedded / docs edited <= 1.5 after one sentence is edited in 1% of the docs;
`tunedex index` wall time, no-op / full <= 0.5% and 1% edited / full <= 1.5%.
The corpus is the .md/.rst/.txt documentation shipped in the venv's site-packages and /usr/share/doc, then in
the base Python, /usr/share and /usr/lib (licences and word lists left out), copied into a temp dir; `tunedex up`
runs on free ports there.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tunedex.infra.services import free_port

REPO = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"licen[cs]e|copying|entry_points|top_level|requirements|record|vocab|merges|authors", re.I)
SKIP_DIR = re.compile(r"/(legal|package-lists|timezonesets|unicore|Unicode)(/|$)")  # legal texts, lists, tables


def doc_sources() -> list[Path]:
    """Documentation files (2-200 kB) under the venv, /usr/share/doc, then the base Python, /usr/share and /usr/lib.

    Each root is sorted on its own, so a smaller --max-mb takes the same first files (the first two roots hold ~8 MB
    on this machine kind; all of them ~25 MB: vim's, CMake's, npm's and gsutil's manuals, packages' READMEs).
    """
    roots = (Path(sys.prefix), Path("/usr/share/doc"), Path(sys.base_prefix), Path("/usr/share"), Path("/usr/lib"))
    seen: set[Path] = set()
    sources = []
    for root in roots:
        found = sorted(p for ext in ("md", "rst", "txt") for p in root.rglob(f"*.{ext}")
                       if p.is_file() and not SKIP.search(p.name) and not SKIP_DIR.search(str(p.parent))
                       and 2_000 <= p.stat().st_size <= 200_000)
        sources += [p for p in found if p.resolve() not in seen]
        seen.update(p.resolve() for p in found)
    return sources


def copy_corpus(dest: Path, max_bytes: int) -> int:
    """Copy UTF-8 documentation into `dest` as .txt, each text once, up to `max_bytes`; return the bytes copied."""
    total = 0
    texts: set[int] = set()
    for i, path in enumerate(doc_sources()):
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if hash(text) in texts:  # the same README vendored in two places
            continue
        if total + len(text) > max_bytes:
            break
        texts.add(hash(text))
        (dest / f"{i:05d}_{path.name}.txt").write_text(text)
        total += len(text.encode())
    return total


def edit_one_sentence(path: Path, rng: random.Random) -> None:
    """Insert a few words into one sentence in the middle of the doc (a real edit, not an append)."""
    text = path.read_text()
    ends = [m.end() for m in re.finditer(r"[a-z]\. ", text)] or [len(text) // 2]
    at = rng.choice(ends[len(ends) // 4 : max(len(ends) // 4 + 1, 3 * len(ends) // 4)]) - 2
    path.write_text(text[:at] + " (as revised)" + text[at:])


def cli(*args: str, cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "tunedex"), *args], cwd=cwd, capture_output=True,
                          text=True, check=True)
    return time.perf_counter() - started, proc.stdout


def index(cfg_path: Path, corpus: Path) -> tuple[float, dict]:
    seconds, out = cli("index", str(corpus), "-c", str(cfg_path), "--json", cwd=cfg_path.parent)
    return seconds, json.loads(out[out.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-mb", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/index_edit.json")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        size = copy_corpus(corpus, int(args.max_mb * 1e6))
        raw = yaml.safe_load((REPO / "configs/local.yaml").read_text())
        raw["data_dir"] = str(tmp / "data")
        raw["milvus"]["uri"] = f"http://127.0.0.1:{free_port()}"
        raw["ray"].update(address=f"127.0.0.1:{free_port()}", dashboard_port=free_port(),
                          client_server_port=free_port(), metrics_export_port=free_port())
        raw["corpus"]["path"] = None
        cfg_path = tmp / "tunedex.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        cli("up", "-c", str(cfg_path), cwd=tmp)
        try:
            t_full, full = index(cfg_path, corpus)
            t_noop, noop = index(cfg_path, corpus)
            docs = sorted(corpus.iterdir())
            picked = rng.sample(docs, max(1, len(docs) // 100))
            for path in picked:
                edit_one_sentence(path, rng)
            t_edit, edit = index(cfg_path, corpus)
        finally:
            cli("down", "-c", str(cfg_path), cwd=tmp)
    result = {
        "corpus_mb": round(size / 1e6, 2), "docs": len(docs), "chunks": full["chunks_total"],
        "docs_edited": len(picked), "chunks_embedded_after_edit": edit["chunks_embedded"],
        "edit_chunks_per_doc": round(edit["chunks_embedded"] / len(picked), 2),
        "full_s": round(t_full, 1), "noop_s": round(t_noop, 2), "edit_s": round(t_edit, 2),
        "noop_pct_of_full": round(100 * t_noop / t_full, 2), "edit_pct_of_full": round(100 * t_edit / t_full, 2),
        "noop_chunks_embedded": noop["chunks_embedded"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(" | ".join(f"{k} {v}" for k, v in result.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
