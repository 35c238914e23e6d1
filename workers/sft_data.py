"""Supervised fine-tuning data: read, render, tokenize with loss masks, split, pack, batch.

Plain functions; the training recipe (workers/finetune.py) calls them in order.
Formats (TRL's): `{"text"}`, `{"prompt", "completion"}`, chat `{"messages": [{role, content}]}`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunedex.infra.errors import TunedexError

IGNORE = -100  # label of a token that carries no loss


class DataError(TunedexError, ValueError):
    """Training data that cannot be used; the message names the file, the lines and the fix."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    loss_tokens: int = 0
    tokens: int = 0
    over: int = 0  # examples longer than max_length (truncated or dropped)
    longest: int = 0  # tokens of the longest example before truncation
    formats: dict[str, int] = field(default_factory=dict)

    def overflow_warning(self, max_length: int, rows: int) -> str:
        """What truncation cost, and the setting that avoids it; "" when nothing was over max_length."""
        if not self.over:
            return ""
        return (f"{self.over} of {rows} examples are longer than finetune.max_length={max_length} (the longest "
                f"{self.longest} tokens): cut from the end, their answers first, or dropped; set "
                f"finetune.max_length: {self.longest} or more")


def example_kind(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    ):
        return "messages"
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return "prompt_completion"
    if isinstance(row.get("text"), str) and row["text"].strip():
        return "text"
    return None


ROLES = {"system", "user", "assistant"}


def example_problem(row: Any) -> str | None:
    """Why a row cannot train anything (None: it can), precisely enough to fix that line."""
    kind = example_kind(row)
    if kind is None:
        return "needs `messages`, `prompt`+`completion` or `text` (strings)"
    if kind == "messages":
        roles = [m["role"] for m in row["messages"]]
        unknown = sorted(set(roles) - ROLES)
        if unknown:
            return f"unknown role(s) {', '.join(unknown)}; use system, user, assistant"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
            return "has no non-empty assistant message: nothing to learn from it"
    if kind == "prompt_completion" and not row["completion"].strip():
        return "has an empty completion: nothing to learn from it"
    return None


def load_examples(path: Path) -> list[dict[str, Any]]:
    """Every bad line is reported with its number; nothing is silently skipped."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"training file {path} {what}; set finetune.train_file to a JSONL file (try `tunedex demo-data`)")
    examples, problems = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                problems.append(f"line {lineno}: not a JSON object ({exc.__class__.__name__})")
                continue
            if reason := example_problem(row):
                problems.append(f"line {lineno}: {reason}")
                continue
            examples.append(row)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{path} has {len(problems)} bad line(s):\n  {shown}")
    if not examples:
        raise DataError(f"{path} holds no examples; add JSONL lines with `messages`, `prompt`/`completion` or `text`")
    return examples


def render(row: dict[str, Any], tokenizer: Any, completion_only: bool) -> tuple[str, list[tuple[int, int]]]:
    """The training text and the character spans that carry loss.

    Chat: the assistant turns (found by rendering each prefix with the tokenizer's own template);
    prompt/completion: the completion; text: all of it. `completion_only=False` puts loss on all.
    """
    kind = example_kind(row)
    if kind == "messages":
        msgs = row["messages"]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant":
                continue
            prefix = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not text.startswith(upto) or not upto.startswith(prefix):
                return text, [(0, len(text))]  # a template that is not prefix-stable: loss on everything
            spans.append((len(prefix), len(upto)))
    elif kind == "prompt_completion":
        text = row["prompt"] + row["completion"] + tokenizer.eos_token
        spans = [(len(row["prompt"]), len(text))]
    else:
        text = row["text"] + tokenizer.eos_token
        spans = [(0, len(text))]
    return text, spans if completion_only else [(0, len(text))]


def tokenize(text: str, spans: list[tuple[int, int]], tokenizer: Any) -> TokenizedExample:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s < end and start < e for s, e in spans) else IGNORE
        for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return TokenizedExample(list(enc["input_ids"]), labels)


def prepare(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int, completion_only: bool, overflow: str
) -> tuple[list[TokenizedExample], DataStats]:
    """Tokenize every row; over `max_length`: truncate or drop (`overflow`), counted either way."""
    stats = DataStats()
    out = []
    for row in rows:
        kind = example_kind(row) or "?"
        stats.formats[kind] = stats.formats.get(kind, 0) + 1
        ex = tokenize(*render(row, tokenizer, completion_only), tokenizer)
        stats.longest = max(stats.longest, len(ex.input_ids))
        if len(ex.input_ids) > max_length:
            stats.over += 1
            if overflow == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ex = TokenizedExample(ex.input_ids[:max_length], ex.labels[:max_length])
        if all(label == IGNORE for label in ex.labels[1:]):
            stats.dropped += 1  # nothing left to learn from (e.g. the completion was truncated away)
            continue
        stats.tokens += len(ex.input_ids)
        stats.loss_tokens += sum(label != IGNORE for label in ex.labels[1:])
        out.append(ex)
    stats.examples = len(out)
    return out, stats


def split(examples: list[Any], eval_ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(len(examples) * eval_ratio)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


@dataclass
class PackedSequence:
    input_ids: list[int]
    labels: list[int]
    segments: list[int]  # which example each token came from: attention stays inside it
    positions: list[int]


def pack(examples: list[TokenizedExample], max_length: int) -> list[PackedSequence]:
    """Greedily fill sequences of up to `max_length` tokens, examples kept whole and in order."""
    packed: list[PackedSequence] = []
    current = PackedSequence([], [], [], [])
    for ex in examples:
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > max_length:
            packed.append(current)
            current = PackedSequence([], [], [], [])
        seg = current.segments[-1] + 1 if current.segments else 0
        current.input_ids += ex.input_ids
        # the first token of an example is never predicted from the one before it (another example)
        current.labels += [IGNORE] + ex.labels[1:]
        current.segments += [seg] * len(ex.input_ids)
        current.positions += list(range(len(ex.input_ids)))
    if current.input_ids:
        packed.append(current)
    return packed


def as_packed(ex: TokenizedExample) -> PackedSequence:
    return PackedSequence(ex.input_ids, [IGNORE] + ex.labels[1:], [0] * len(ex.input_ids), list(range(len(ex.input_ids))))


def collate(batch: list[PackedSequence], pad_id: int) -> dict[str, Any]:
    """Pad to the longest sequence; a block-diagonal causal mask keeps each example to itself."""
    import torch

    width = max(len(x.input_ids) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    segments = torch.full((len(batch), width), -1, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(batch):
        n = len(seq.input_ids)
        input_ids[i, :n] = torch.tensor(seq.input_ids)
        labels[i, :n] = torch.tensor(seq.labels)
        segments[i, :n] = torch.tensor(seq.segments)
        positions[i, :n] = torch.tensor(seq.positions)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    # padding rows attend to themselves only, so no row of the mask is empty
    mask = (same & causal) | torch.eye(width, dtype=torch.bool)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}
