"""Evaluate a release on a QA set: do its answers hold the reference, and did retrieval find the support?

A QA set is JSONL, one question per line: `question`, `answer` (the reference), optional `doc_ids` (the
documents that support it), `split` (`static` / `changed`) and `as_of`. `evaluate_release` runs a
release's model in this process (batched, greedy) with the endpoint's own prompt builder and hybrid
search, so it measures what the endpoint would answer. `gate` is the promotion decision the
`evaluate-and-promote` flow applies.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedex.infra.config import EvaluateConfig, TunedexConfig

STRATEGIES = ("hybrid", "finetuned")


class EvalError(ValueError):
    """A QA set or release that cannot be evaluated; the message names it and the fix."""


@dataclass(frozen=True)
class QAItem:
    question: str
    answer: str
    doc_ids: tuple[str, ...] = ()
    split: str = ""
    as_of: str = ""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def load_qa(path: Path, limit: int | None = None) -> list[QAItem]:
    """Every bad line is reported with its number; an empty set is an error."""
    if not Path(path).is_file():
        raise EvalError(f"QA set {path} does not exist; set evaluate.qa_file (try `tunedex demo-data`: DIR/day1/qa.jsonl)")
    items, problems = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EvalError(f"QA set {path} is not UTF-8 text; save it as UTF-8 JSONL") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise ValueError("needs string fields `question` and `answer`")
            doc_ids = row.get("doc_ids") or []
            if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
                raise ValueError("`doc_ids` must be a list of strings")
            items.append(QAItem(row["question"], row["answer"], tuple(doc_ids), str(row.get("split", "")),
                                str(row.get("as_of", ""))))
        except ValueError as exc:  # JSONDecodeError is a ValueError
            problems.append(f"line {n}: {exc}")
    if problems:
        raise EvalError(f"QA set {path} has {len(problems)} bad line(s): " + "; ".join(problems[:5]))
    if not items:
        raise EvalError(f"QA set {path} holds no questions")
    return items[:limit] if limit else items


def normalize(text: str) -> str:
    text = text.lower().replace("[1]", " ").replace("[2]", " ").replace("[3]", " ")
    text = "".join(" " if ch in string.punctuation and ch not in "$." else ch for ch in text)
    return re.sub(r"\s+", " ", text.replace(". ", " ")).strip(" .")


def answer_scores(prediction: str, reference: str) -> dict[str, float]:
    pred, ref = normalize(prediction), normalize(reference)
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    f1 = 0.0 if not common else 2 * common / (len(pred_tokens) + len(ref_tokens))
    return {"exact": float(pred == ref), "contains": float(bool(ref) and ref in pred), "f1": f1}


def retrieval_scores(retrieved: list[str], gold: tuple[str, ...]) -> dict[str, float]:
    """recall@k: share of the supporting docs retrieved; MRR: 1 / rank of the first supporting doc."""
    if not gold:
        return {}
    ranks = [i for i, doc in enumerate(retrieved, 1) if doc in gold]
    return {"recall": len(set(retrieved) & set(gold)) / len(set(gold)), "mrr": 1 / ranks[0] if ranks else 0.0}


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {key: mean([r[key] for r in rows]) for key in ("exact", "contains", "f1")}
    for key in ("recall", "mrr"):
        scored = [r[key] for r in rows if key in r]
        if scored:
            out[key] = mean(scored)
    out["n"] = len(rows)
    return out


def evaluate_release(cfg: TunedexConfig, model_path: str, collection: str, items: list[QAItem],
                     strategy: str = "hybrid", batch_size: int = 16) -> dict[str, Any]:
    """Answer every question as the endpoint would (`hybrid`: retrieve then generate; `finetuned`: no retrieval)."""
    from tunedex.infra import store
    from tunedex.infra.embedding import load_embedder
    from tunedex.serving.generation import Sampling, generate_batch, load_generator
    from tunedex.serving.prompt import build_messages

    if strategy not in STRATEGIES:
        raise EvalError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not Path(model_path).is_dir():
        raise EvalError(f"model dir {model_path} does not exist; promote or fine-tune a model first")
    started = time.perf_counter()
    model, tokenizer = load_generator(model_path)
    hits: list[list[Any]] = [[] for _ in items]
    if strategy == "hybrid":
        embedder, client = load_embedder(cfg.embedding), store.connect(cfg.milvus)
        client.load_collection(collection)
        vectors = embedder.embed([it.question for it in items])
        hits = [store.hybrid_search(client, cfg.milvus, collection, v, it.question, cfg.serve.top_k)
                for v, it in zip(vectors, items)]
    prompts = [build_messages(it.question, [h.text for h in found]) for it, found in zip(items, hits)]
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        answers += generate_batch(model, tokenizer, chunk, [Sampling()] * len(chunk), cfg.serve.max_new_tokens)
    rows = []
    for it, found, answer in zip(items, hits, answers):
        row = {"question": it.question, "reference": it.answer, "answer": answer, "split": it.split,
               **answer_scores(answer, it.answer)}
        if strategy == "hybrid":
            row.update(retrieval_scores([h.doc_id for h in found], it.doc_ids))
        rows.append(row)
    splits = sorted({r["split"] for r in rows if r["split"]})
    return {"model_path": model_path, "collection": collection, "strategy": strategy, **summarize(rows),
            "by_split": {s: summarize([r for r in rows if r["split"] == s]) for s in splits},
            "seconds": round(time.perf_counter() - started, 1), "rows": rows}


def gate(candidate: dict[str, Any], current: dict[str, Any] | None, ev: EvaluateConfig) -> Decision:
    """Promote when the candidate reaches `min_score` and does not fall more than `max_regression` below
    the serving release on `metric`."""
    score = candidate[ev.metric]
    if score < ev.min_score:
        return Decision(False, f"{ev.metric} {score:.3f} is below evaluate.min_score {ev.min_score:.3f}")
    if current is not None and score < current[ev.metric] - ev.max_regression:
        return Decision(False, f"{ev.metric} {score:.3f} is below the serving release's {current[ev.metric]:.3f} "
                               f"by more than evaluate.max_regression {ev.max_regression:.3f}")
    base = f" (serving release: {current[ev.metric]:.3f})" if current is not None else " (nothing served yet)"
    return Decision(True, f"{ev.metric} {score:.3f} passes{base}")
