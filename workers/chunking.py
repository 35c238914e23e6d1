"""Token-aware chunking with the embedding model's own tokenizer."""

from __future__ import annotations

from typing import Any


def chunk_text(text: str, tokenizer: Any, size: int, overlap: int) -> list[str]:
    """Windows of `size` tokens, `overlap` tokens shared between neighbours, cut at token boundaries.

    Chunk text is a slice of the original string (offsets from the fast tokenizer), so no
    detokenization artefacts enter the index.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]
    if not offsets:
        return [text.strip()] if text.strip() else []
    chunks = []
    step = size - overlap
    for start in range(0, len(offsets), step):
        window = offsets[start : start + size]
        piece = text[window[0][0] : window[-1][1]].strip()
        if piece:
            chunks.append(piece)
        if start + size >= len(offsets):
            break
    return chunks
