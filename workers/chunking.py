"""Boundary-aware chunking with the embedding model's own tokenizer (a `tokenizers.Tokenizer`, infra/embedding.py).

Chunks are built from paragraphs (sentences for a paragraph over `size` tokens, token windows
for a sentence over `size`), packed greedily up to `size` tokens. A chunk also ends after any
unit whose text hash says so (content-defined, about one unit in three, once the chunk holds a
quarter of `size`): an edit then moves only the boundaries next to it, and the packing is back in
step a unit or two later, so an edit re-embeds about the chunks it touches rather than the rest of
the document. Inside an overlong sentence the token windows are cut the same way, on a hash of
the tokens at the cut.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

# A content-defined end is taken only once a chunk holds size // MIN_FRACTION tokens (the minimum chunk size of
# content-defined chunking, as in FastCDC): a short document stays one chunk, and a chunk is not a lone heading
# or list item that retrieval would return without the facts next to it. Measured on ~8 MB of real docs (60
# one-sentence edits): median 1 chunk re-embedded per edit with or without it, mean chunk 129 vs 100 tokens.
MIN_FRACTION = 4

PARAGRAPH = re.compile(r"\S(?:.*?\S)?(?=\s*\n\s*\n|\s*$)", re.S)
SENTENCE = re.compile(r"\S.*?(?:[.!?](?=\s)|$)", re.S)


def _ends_chunk(text: str) -> bool:
    """About one unit in three ends a chunk, decided by its first 32 characters: an edit past them (most edits of a
    sentence or paragraph) keeps the decision, and with it the chunk boundaries around the edit."""
    return hashlib.blake2b(text[:32].encode("utf-8"), digest_size=1).digest()[0] % 3 == 0


def _cuts(text: str, odds: int) -> bool:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "big") % odds == 0


def _units(text: str, tokenizer: Any, size: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, end, tokens) of each paragraph, sentence or token window, in order; every one <= size tokens."""
    out = []
    for para in PARAGRAPH.finditer(text):
        spans = [para.span()]
        if _count(tokenizer, para.group()) > size:
            spans = [(para.start() + s.start(), para.start() + s.end()) for s in SENTENCE.finditer(para.group())]
        for start, end in spans:
            n = _count(tokenizer, text[start:end])
            if n <= size:
                out.append((start, end, n))
            else:
                out.extend(_windows(text, start, end, tokenizer, size, overlap))
    return out


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _windows(text: str, start: int, end: int, tokenizer: Any, size: int, overlap: int) -> list[tuple[int, int, int]]:
    """A sentence over `size` tokens: windows of at most `size` tokens, `overlap` shared, cut at token boundaries.
    A window also ends after a token whose text, with the two before it, hashes so (odds 1 in size // 3, once the
    window holds a quarter of `size`; 1 window in 10 reaches `size`): content-defined like the chunk ends, so an
    edit inside a long run of text without sentences (data, logs) moves the cuts near it only, not every window
    after it."""
    enc = tokenizer.encode(text[start:end], add_special_tokens=False)
    offsets = [(start + a, start + b) for a, b in enc.offsets if b > a]
    out, i = [], 0
    while True:
        n = min(size, len(offsets) - i)
        for j in range(i + size // MIN_FRACTION, i + n - 1):
            if _cuts(text[offsets[max(i, j - 2)][0] : offsets[j][1]], max(1, size // 3)):
                n = j - i + 1
                break
        # a window that starts inside a word re-tokenizes to a token or two more on its own: trim it
        while n > 1 and _count(tokenizer, text[offsets[i][0] : offsets[i + n - 1][1]]) > size:
            n -= 1
        window = offsets[i : i + n]
        out.append((window[0][0], window[-1][1], _count(tokenizer, text[window[0][0] : window[-1][1]])))
        if i + n >= len(offsets):
            return out
        i += max(1, n - overlap)


def chunk_text(text: str, tokenizer: Any, size: int, overlap: int) -> list[str]:
    """Chunks of at most `size` tokens on paragraph / sentence boundaries; deterministic.

    Chunk text is a slice of the original string, so no detokenization artefacts enter the index.
    Units are joined by whitespace, and WordPiece splits on whitespace first, so a chunk's token
    count is the sum of its units' counts. `overlap` applies only inside an overlong sentence.
    """
    chunks: list[str] = []
    first = last = None
    tokens = 0
    for start, end, n in _units(text, tokenizer, size, overlap):
        if first is not None and tokens + n > size:
            chunks.append(text[first:last])
            first, tokens = None, 0
        first = start if first is None else first
        last, tokens = end, tokens + n
        if tokens >= size // MIN_FRACTION and _ends_chunk(text[start:end]):
            chunks.append(text[first:last])
            first, tokens = None, 0
    if first is not None:
        chunks.append(text[first:last])
    return chunks
