"""Freshness: how soon an edited, deleted or added document reaches the endpoint's answers, under load.

    python bench/freshness.py                  # 20 edits, 5 deletes, 5 adds; ~10 min on 2 cores

Targets (issue 18): edit -> first answer whose sources carry the new text, and delete -> last answer citing the
deleted document, p95 <= 60 s each, 0 failed requests, on the embedded default (milvus-lite 2.5) with 2 cores.
It starts its own Milvus Lite server and Ray head on free ports (temporary data dir), serves a tiny random-weight
model on the demo catalog, runs `tunedex watch` on a copy of the corpus, keeps `--clients` query clients busy,
and times each change from the moment its file is written. Writes bench/results/freshness.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from serve_bench import build_model, new_release, write_config
from tunedex.demo_data import write_demo_data
from tunedex.infra import registry, services
from tunedex.infra.config import load_config

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.2
GIVE_UP_S = 300


class Load:
    """`clients` threads asking catalog questions back to back; every status but 200 counts as a failure."""

    def __init__(self, url: str, questions: list[str], clients: int):
        self.url, self.questions, self.stop = url, questions, threading.Event()
        self.ok = self.failed = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                try:
                    status = http.post(f"{self.url}/v1/query", json={"question": rng.choice(self.questions)}).status_code
                except httpx.HTTPError:
                    status = 0
                self.ok, self.failed = (self.ok + 1, self.failed) if status == 200 else (self.ok, self.failed + 1)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def cites(http: httpx.Client, url: str, question: str, doc_id: str) -> list[str]:
    """The texts of the sources from `doc_id` in the endpoint's answer to `question`."""
    resp = http.post(f"{url}/v1/query", json={"question": question})
    resp.raise_for_status()
    return [s["text"] for s in resp.json()["sources"] if s["doc_id"] == doc_id]


def until_cited(http: httpx.Client, url: str, question: str, doc_id: str, needle: str, since: float) -> float:
    """Seconds from `since` to the first answer citing `doc_id` with `needle` in the cited text."""
    while time.monotonic() - since < GIVE_UP_S:
        if any(needle in text for text in cites(http, url, question, doc_id)):
            return time.monotonic() - since
        time.sleep(POLL_S)
    return float("inf")


def last_citation(http: httpx.Client, url: str, question: str, doc_id: str, since: float, clear: int = 10) -> float:
    """Seconds from `since` to the last answer citing `doc_id`, once `clear` answers in a row have not (0: never)."""
    last, quiet = 0.0, 0
    while quiet < clear and time.monotonic() - since < GIVE_UP_S:
        if cites(http, url, question, doc_id):
            last, quiet = time.monotonic() - since, 0
        else:
            quiet += 1
        time.sleep(POLL_S)
    return last if quiet >= clear else float("inf")


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 2), "p95": round(p95, 2),
            "max": round(ordered[-1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--deletes", type=int, default=5)
    parser.add_argument("--adds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--debounce", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = write_config(tmp, 16)
        cfg = load_config(path)
        os.environ.update(services.ray_env(cfg))
        demo = write_demo_data(tmp / "demo", n_products=60)
        corpus = tmp / "corpus"
        shutil.copytree(demo["day1"], corpus)
        pages = sorted((corpus / "products").glob("*.md"))
        model = build_model(tmp / "model", [p.read_text() for p in pages], {"n_layer": 2, "n_embd": 128, "n_head": 4})
        questions = [json.loads(line)["question"] for line in demo["qa"].read_text().splitlines()]
        services.up(cfg)
        watcher = load = None
        try:
            from tunedex.infra.services import connect_ray
            from tunedex.serving import control
            from tunedex.workers.embed import index_corpus

            index_corpus(cfg, corpus)
            registry.promote(cfg.registry_dir, new_release(cfg, model, registry.live_collection(cfg)))
            with connect_ray(cfg):
                control.start(cfg, path, [])
            watcher = subprocess.Popen([str(Path(sys.executable).parent / "tunedex"), "watch", str(corpus), "-c",
                                        str(path), "--debounce", str(args.debounce)], cwd=tmp,
                                       stdout=open(tmp / "watch.log", "w"), stderr=subprocess.STDOUT)
            while "pass after start" not in (tmp / "watch.log").read_text():  # watching, and caught up
                assert watcher.poll() is None, (tmp / "watch.log").read_text()
                time.sleep(0.5)
            load = Load(cfg.serve.url, questions, args.clients)
            url, rng = cfg.serve.url, random.Random(0)
            edits, deletes, adds = [], [], []
            with httpx.Client(timeout=120) as http:
                for i in range(args.edits):
                    page = pages[i % len(pages)]
                    doc_id, name = page.relative_to(corpus).as_posix(), page.read_text().splitlines()[0].lstrip("# ")
                    price = f"${600 + i}.{rng.randrange(100):02d}"
                    text = re.sub(r"\$\d+\.\d\d", price, page.read_text())
                    since = time.monotonic()
                    page.write_text(text)
                    edits.append(until_cited(http, url, f"How much does the {name} cost?", doc_id, price, since))
                    print(f"edit {i + 1}: {edits[-1]:.1f} s", flush=True)
                for j in range(args.deletes):
                    page = pages[-1 - j]
                    doc_id, name = page.relative_to(corpus).as_posix(), page.read_text().splitlines()[0].lstrip("# ")
                    since = time.monotonic()
                    page.unlink()
                    deletes.append(last_citation(http, url, f"How much does the {name} cost?", doc_id, since))
                    print(f"delete {j + 1}: last cited {deletes[-1]:.1f} s after", flush=True)
                for k in range(args.adds):
                    name = f"Freshness Gadget {900 + k}"
                    page = corpus / "products" / f"fresh-{900 + k}.md"
                    template = pages[k].read_text()
                    text = template.replace(template.splitlines()[0].lstrip("# "), name)
                    since = time.monotonic()
                    page.write_text(text)
                    adds.append(until_cited(http, url, f"How much does the {name} cost?",
                                            page.relative_to(corpus).as_posix(), name, since))
                    print(f"add {k + 1}: {adds[-1]:.1f} s", flush=True)
        finally:
            if load:
                load.close()
            if watcher:
                watcher.terminate()
                watcher.wait(timeout=60)
            passes = [line for line in (tmp / "watch.log").read_text().splitlines() if " pass after " in line] \
                if (tmp / "watch.log").exists() else []
            services.down(cfg)
    result = {"edit_to_first_answer_s": summary(edits), "delete_to_last_citation_s": summary(deletes),
              "add_to_first_answer_s": summary(adds), "requests_ok": load.ok, "requests_failed": load.failed,
              "watch_passes": len(passes), "clients": args.clients, "debounce_s": args.debounce,
              "products": len(pages), "machine_cpus": os.cpu_count()}
    out = REPO / "bench" / "results" / "freshness.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"targets: edit p95 {result['edit_to_first_answer_s']['p95']} s, delete p95 "
          f"{result['delete_to_last_citation_s']['p95']} s (<= 60 each), failed {load.failed} (0)")


if __name__ == "__main__":
    main()
