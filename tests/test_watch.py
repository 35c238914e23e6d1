"""`tunedex watch` keeps the served index fresh: after the watcher's pass, the endpoint cites an edited document's
new text and never again a deleted one (behaviour; bench/freshness.py measures how soon, under load)."""

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import run_cli

# the first test to use `pipeline` pays for its set-up (index, fine-tune, vLLM serve) within its timeout
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

AUTH = {"Authorization": "Bearer test-key-123"}


class Watcher:
    """`tunedex watch CORPUS` in its own process; its pass lines read as they come."""

    def __init__(self, corpus: Path, config: str, cwd: Path, *overrides: str):
        sets = [a for o in overrides for a in ("--set", o)]
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "tunedex"), "watch", str(corpus), "-c",
                                      config, *sets, "--debounce", "0.5"], cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def next_pass(self, wanted: str, timeout: float = 600) -> str:
        """The next pass line matching the regex `wanted` (a pass per settled change; extra passes are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "tunedex watch exited:\n" + "".join(self.seen[-40:])
                continue
            self.seen.append(line)
            if " pass after " in line and re.search(wanted, line):
                return line
        raise AssertionError(f"no pass matching {wanted!r} in {timeout:.0f} s:\n" + "".join(self.seen[-40:]))


def ask(url: str, question: str) -> dict:
    resp = httpx.post(f"{url}/v1/query", json={"question": question}, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_watch_brings_an_edit_and_a_delete_to_the_endpoint(pipeline, demo, tmp_path):
    """The watcher keeps a collection of its own, served by a release on it (promoted, then rolled back to the
    pipeline's), so the tests after this one see the index as they left it."""
    cfg, path, cwd = pipeline["cfg"], str(pipeline["path"]), pipeline["cwd"]
    corpus = tmp_path / "corpus"
    shutil.copytree(demo["day1"], corpus)
    pages = sorted((corpus / "products").glob("*.md"))
    edited, deleted = pages[0], pages[1]
    doc_edited, doc_deleted = (p.relative_to(corpus).as_posix() for p in (edited, deleted))
    names = {p: p.read_text().splitlines()[0].lstrip("# ") for p in (edited, deleted)}
    own = f"milvus.collection={cfg.milvus.collection}_watch"
    before = httpx.get(f"{cfg.serve.url}/readyz", timeout=10).json()["release_id"]
    watcher = Watcher(corpus, path, cwd, own)
    try:
        first = watcher.next_pass(r"after start")
        collection = re.search(r"indexed (\S+):", first).group(1)
        run_cli("promote", "--collection", collection, "-c", path, cwd=cwd)

        edited.write_text(re.sub(r"\$\d+\.\d\d", "$999.99", edited.read_text()))  # the price, everywhere on the page
        watcher.next_pass(r"~1 ")
        sources = ask(cfg.serve.url, f"How much does the {names[edited]} cost?")["sources"]
        cited = [s for s in sources if s["doc_id"] == doc_edited]
        assert cited, f"{doc_edited} not among the sources {[s['doc_id'] for s in sources]}"
        assert all("$999.99" in s["text"] for s in cited), cited  # the new version, never a chunk of the old one

        deleted.unlink()
        watcher.next_pass(r" -1 ")
        for question in (f"How much does the {names[deleted]} cost?", f"What warranty does the {names[deleted]} have?",
                         names[deleted]):
            assert doc_deleted not in [s["doc_id"] for s in ask(cfg.serve.url, question)["sources"]], question
    finally:
        watcher.proc.send_signal(signal.SIGTERM)  # as Kubernetes stops a pod; Ctrl-C (SIGINT) does the same
        try:
            rc = watcher.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            watcher.proc.kill()
            raise
        finally:
            run_cli("promote", before, "-c", path, cwd=cwd)
    assert rc == 0, "".join(watcher.seen[-20:])
