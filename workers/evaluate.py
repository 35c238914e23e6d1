"""Evaluate a release on a QA set: fine-tune, RAG, or both, measured on the user's own data.

A QA set is JSONL, one question per line: `question`, `answer` (the reference), optional `doc_ids` (the
documents that support it), `split` (`static`: unchanged since fine-tuning / `changed`) and `as_of`.
Four strategies answer it (`STRATEGY_PARTS`): the base model and the fine-tuned one, each closed-book
and with retrieval (`rag`, `hybrid`). Models run in this process (greedy, batched) with the endpoint's
own prompt builder and hybrid search, so the answers are what the endpoint would give. Every metric
carries a 95% bootstrap interval; `workers/report.py` turns the result into the report, and `gate` is
the promotion decision the `evaluate-and-promote` flow applies.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedex.infra.config import EvaluateConfig, TunedexConfig
from tunedex.infra.errors import TunedexError

class EvalError(TunedexError, ValueError):
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


CITATION = re.compile(r"\[\d+\]")  # [n]: the source markers answers carry, for any serve.top_k


def normalize(text: str) -> str:
    text = CITATION.sub(" ", text.lower())
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


def attribution(answer: str, cited_docs: list[str], gold: tuple[str, ...]) -> float:
    """1 when the answer cites (`[n]`) a retrieved chunk of a supporting document."""
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", answer)}
    return float(any(1 <= n <= len(cited_docs) and cited_docs[n - 1] in gold for n in cited))


def bootstrap_ci(values: list[float], rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean, by resampling the questions."""
    import random

    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(rounds))
    return (round(means[int(0.025 * rounds)], 4), round(means[min(rounds - 1, int(0.975 * rounds))], 4))


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


METRICS = ("exact", "contains", "f1", "recall", "mrr", "attribution", "style")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric the rows carry; `ci` holds its 95% bootstrap interval."""
    out: dict[str, Any] = {"n": len(rows), "ci": {}}
    for key in METRICS:
        scored = [r[key] for r in rows if key in r]
        if scored:
            out[key] = mean(scored)
            out["ci"][key] = bootstrap_ci(scored)
    return out


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else 0.0


# strategy -> (which model answers, whether it retrieves first)
STRATEGY_PARTS = {"base": ("base", False), "finetuned": ("finetuned", False), "rag": ("base", True),
                  "hybrid": ("finetuned", True)}


def evaluate_strategies(cfg: TunedexConfig, model_path: str, collection: str, items: list[QAItem],
                        strategies: list[str], base_model_path: str = "", batch_size: int = 16,
                        latency_samples: int = 20) -> dict[str, Any]:
    """Answer every question with each strategy, as the endpoint would; score the answers, time single
    requests (retrieval + generation) for latency, and a batched pass for throughput."""
    from tunedex.infra import store
    from tunedex.infra.embedding import load_embedder
    from tunedex.infra.generation import Sampling, generate_batch, load_generator
    from tunedex.infra.prompt import SYSTEM_PROMPT, build_messages, guard_answer

    unknown = [s for s in strategies if s not in STRATEGY_PARTS]
    if unknown:
        raise EvalError(f"unknown strategy {unknown[0]!r}; use {', '.join(STRATEGY_PARTS)}")
    paths = {"finetuned": model_path, "base": base_model_path}
    models = {}
    for kind in sorted({STRATEGY_PARTS[s][0] for s in strategies}):
        if not paths[kind] or not Path(paths[kind]).is_dir():
            raise EvalError(f"the {kind} model dir {paths[kind] or '(none)'} does not exist; "
                            + ("fine-tune or promote a model first" if kind == "finetuned" else
                               "the model card's base_model_path names it (re-run the fine-tune), or skip base/rag"))
        models[kind] = load_generator(paths[kind])
    hits: list[list[Any]] = [[] for _ in items]
    retrieve_ms: list[float] = []
    if any(STRATEGY_PARTS[s][1] for s in strategies):
        embedder = load_embedder(cfg.embedding)
        with closing(store.connect(cfg.milvus)) as client:
            client.load_collection(collection)
            for i, it in enumerate(items):
                started = time.perf_counter()
                vector = embedder.embed([it.question])[0]
                hits[i] = store.hybrid_search(client, cfg.milvus, collection, vector, it.question, cfg.serve.top_k)
                retrieve_ms.append((time.perf_counter() - started) * 1000)
    style = re.compile(cfg.evaluate.style_pattern, re.S) if cfg.evaluate.style_pattern else None
    out: dict[str, Any] = {}
    for strategy in strategies:
        kind, retrieves = STRATEGY_PARTS[strategy]
        model, tokenizer = models[kind]
        system_prompt = cfg.serve.system_prompt or SYSTEM_PROMPT
        contexts = [[h.text for h in found] if retrieves else [] for found in hits]
        prompts = [build_messages(it.question, ctx, system_prompt=system_prompt) for it, ctx in zip(items, contexts)]
        started = time.perf_counter()
        answers: list[str] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            answers += generate_batch(model, tokenizer, chunk, [Sampling()] * len(chunk), cfg.serve.max_new_tokens)
        answers = [guard_answer(a, system_prompt, ctx) for a, ctx in zip(answers, contexts)]  # what clients see
        throughput = len(prompts) / (time.perf_counter() - started)
        latencies = []
        for i in range(min(latency_samples, len(prompts))):
            t = time.perf_counter()
            generate_batch(model, tokenizer, [prompts[i]], [Sampling()], cfg.serve.max_new_tokens)
            latencies.append((time.perf_counter() - t) * 1000 + (retrieve_ms[i] if retrieves else 0.0))
        rows = []
        for it, found, answer in zip(items, hits, answers):
            row = {"question": it.question, "reference": it.answer, "answer": answer, "split": it.split,
                   **answer_scores(answer, it.answer)}
            if retrieves:
                docs = [h.doc_id for h in found]
                row.update(retrieval_scores(docs, it.doc_ids))
                if it.doc_ids:
                    row["attribution"] = attribution(answer, docs, it.doc_ids)
            if style is not None:
                row["style"] = float(bool(style.search(answer)))
            rows.append(row)
        splits = sorted({r["split"] for r in rows if r["split"]})
        out[strategy] = {**summarize(rows), "by_split": {s: summarize([r for r in rows if r["split"] == s]) for s in splits},
                         "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                                        "samples": [round(x, 1) for x in latencies]},
                         "throughput_qps": round(throughput, 2),
                         "cost_per_1k_usd": cost_per_1k(cfg, throughput, retrieves), "rows": rows}
    return out


def cost_per_1k(cfg: TunedexConfig, throughput_qps: float, retrieves: bool) -> float:
    """Serving cost of 1,000 queries at the measured batched throughput: accelerator time, plus embedding
    the questions when the strategy retrieves (at `evaluate.embedding_usd_per_1m_tokens`, ~20 tokens each)."""
    c = cfg.evaluate
    seconds = 1000 / throughput_qps if throughput_qps > 0 else float("inf")
    usd = seconds / 3600 * c.gpu_hour_usd * c.gpus_per_replica
    if retrieves:
        usd += 1000 * 20 / 1e6 * c.embedding_usd_per_1m_tokens
    return round(usd, 4)


def evaluate_release(cfg: TunedexConfig, model_path: str, collection: str, items: list[QAItem],
                     strategy: str = "hybrid", batch_size: int = 16) -> dict[str, Any]:
    """One strategy's figures (the promotion gate's input)."""
    started = time.perf_counter()
    result = evaluate_strategies(cfg, model_path, collection, items, [strategy], batch_size=batch_size,
                                 latency_samples=0)[strategy]
    return {"model_path": model_path, "collection": collection, "strategy": strategy, **result,
            "seconds": round(time.perf_counter() - started, 1)}


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


def one_off_costs(cfg: TunedexConfig, model_path: str, collection: str) -> dict[str, Any]:
    """What this release cost once: the fine-tune's accelerator hours (from its model card) and embedding
    the corpus (chunks in the collection, each at most `chunking.chunk_size` tokens)."""
    from tunedex.infra import store

    out: dict[str, Any] = {}
    card_path = Path(model_path) / "model_card.json"
    if card_path.is_file():
        card = json.loads(card_path.read_text(encoding="utf-8"))
        workers = card["config"]["ray"]["num_workers"]
        hours = card["metrics"]["seconds"] * workers / 3600
        out["finetune_accelerator_hours"] = round(hours, 4)
        out["finetune_usd"] = round(hours * cfg.evaluate.gpu_hour_usd, 4)
    try:
        with closing(store.connect(cfg.milvus)) as client:
            rows = client.get_collection_stats(collection)["row_count"]
        tokens = int(rows) * cfg.chunking.chunk_size
        out["corpus_chunks"] = int(rows)
        out["corpus_embedding_usd_at_most"] = round(tokens / 1e6 * cfg.evaluate.embedding_usd_per_1m_tokens, 6)
    except Exception as exc:  # noqa: BLE001 - the report still stands without this line
        out["corpus_embedding_usd_at_most"] = f"unknown ({type(exc).__name__})"
    return out


def build_report(cfg: TunedexConfig, release: Any, qa_file: Path, strategies: list[str],
                 max_questions: int | None = None) -> dict[str, Any]:
    """Evaluate `release` (a registry Release) with each strategy on `qa_file`; the report's data."""
    from datetime import datetime, timezone

    from tunedex.workers.report import recommend

    items = load_qa(qa_file, max_questions)
    results = evaluate_strategies(cfg, release.model_path, release.collection, items, strategies,
                                  base_model_path=release.base_model)
    report = {"release_id": release.release_id, "model_path": release.model_path, "collection": release.collection,
              "base_model": release.base_model, "qa_file": str(qa_file), "n": len(items), "metric": cfg.evaluate.metric,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "criteria": {"facts_change": cfg.evaluate.facts_change, "need_attribution": cfg.evaluate.need_attribution,
                           "latency_budget_ms": cfg.evaluate.latency_budget_ms},
              "strategies": results, "one_off": one_off_costs(cfg, release.model_path, release.collection)}
    report["recommendation"] = recommend(report, cfg.evaluate)
    return report
