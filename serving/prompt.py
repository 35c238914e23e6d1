"""The prompt the endpoint sends to the model: the same chat format training used."""

from __future__ import annotations

from typing import Any, Sequence

SYSTEM_PROMPT = "You are the Tunedex Store support assistant. Answer from the context when it is given."


def context_block(contexts: Sequence[str]) -> str:
    """Retrieved chunks as numbered context: the `[n]` an answer cites is `sources[n-1]`."""
    return "Context:\n" + "\n".join(f"[{i}] {text}" for i, text in enumerate(contexts, 1))


def build_messages(question: str, contexts: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages; retrieved chunks go into the system turn. Training data is built with this too."""
    if not contexts:
        return [{"role": "user", "content": question}]
    return [
        {"role": "system", "content": f"{SYSTEM_PROMPT}\n{context_block(contexts)}"},
        {"role": "user", "content": question},
    ]


def build_chat_messages(messages: list[dict[str, str]], contexts: Sequence[str]) -> list[dict[str, str]]:
    """A client's conversation with our system turn (and the retrieved context) in front of it."""
    system = "\n".join([SYSTEM_PROMPT, *(m["content"] for m in messages if m["role"] == "system")])
    if contexts:
        system += "\n" + context_block(contexts)
    return [{"role": "system", "content": system}, *(m for m in messages if m["role"] != "system")]


def source_entries(hits: Sequence[Any]) -> list[dict[str, Any]]:
    """`sources[n-1]` is the chunk the answer's `[n]` marker refers to."""
    return [
        {"index": i, "chunk_id": h.chunk_id, "doc_id": h.doc_id, "doc_version": h.doc_version,
         "score": round(h.score, 6), "text": h.text}
        for i, h in enumerate(hits, 1)
    ]
