"""Long prompts and BREAK: token ids in CLIP-sized chunks, the way A1111 builds them.

A CLIP text encoder reads 77 tokens (start, 75 of text, end). A1111 encodes a longer prompt in
pieces of 75 text tokens, each wrapped in start/end and padded to 77, runs every piece through
the encoder and concatenates the results along the sequence axis (so the UNet's cross-attention
sees 77, 154, 231, ... tokens). Its rules, followed here:

- the word ``BREAK`` (upper case, a word of its own) closes the current chunk and starts the next
  one (two BREAKs in a row leave an empty chunk between them; a BREAK at the very end adds none);
- a chunk that fills up in the middle of a phrase moves the words after its last comma into the
  next chunk when that comma is at most ``COMMA_BACKTRACK`` tokens back (A1111's
  ``comma_padding_backtrack``, default 20);
- texts encoded together (positive and negative, the frames of a layer job) get the same number of
  chunks: the shorter ones are padded with empty chunks (start, then end tokens).

Pure Python over token ids: the tokenizer is passed in as a function, so every backend (and every
text encoder of a backend: SDXL has two) uses this one module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
MAX_CHUNKS = 40  # 3000 CLIP tokens, far beyond any real prompt; the rest of a longer text is dropped (with a notice)


@dataclass(frozen=True)
class ChunkSpec:
    """The special tokens and the window of one tokenizer/encoder pair."""

    bos: int
    eos: int
    pad: int  # what follows the end token (SD1.5's CLIP: the end token again; SDXL's OpenCLIP: 0, "!")
    length: int = 77  # tokens per chunk, start and end included
    comma: Optional[int] = None  # the id of "," on its own (None: no comma backtracking)

    @property
    def text_tokens(self) -> int:
        return self.length - 2


def split_break(text: str) -> list[str]:
    """The parts of `text` between BREAK words (whitespace around each BREAK dropped)."""
    return BREAK_RE.split(text or "")


def only_break(text: Optional[str]) -> bool:
    """True for a text that holds BREAK and nothing else (no words once the BREAKs are taken out)."""
    return bool(text) and BREAK_RE.search(text) is not None and not any(p.strip() for p in split_break(text))


def chunk_tokens(parts: Sequence[Sequence[int]], spec: ChunkSpec, backtrack: int = COMMA_BACKTRACK) -> list[list[int]]:
    """Text token ids (no start/end), one list per BREAK-separated part -> chunks of at most
    ``spec.text_tokens`` ids each (not yet wrapped or padded). Always at least one chunk."""
    size = spec.text_tokens
    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1
    for k, ids in enumerate(parts):
        if k > 0:  # a BREAK stood before this part: close the chunk, even an empty one
            chunks.append(chunk)
            chunk, last_comma = [], -1
        for token in ids:
            if spec.comma is not None and token == spec.comma:
                last_comma = len(chunk)
            elif backtrack and len(chunk) == size and last_comma != -1 and len(chunk) - last_comma <= backtrack:
                chunks.append(chunk[: last_comma + 1])  # the words after the comma go on to the next chunk
                chunk, last_comma = chunk[last_comma + 1:], -1
            if len(chunk) == size:
                chunks.append(chunk)
                chunk, last_comma = [], -1
            chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def wrap_chunk(ids: Sequence[int], spec: ChunkSpec) -> list[int]:
    """start + ids + end, padded to ``spec.length`` with the pad token."""
    if len(ids) > spec.text_tokens:
        raise ValueError(f"a chunk holds at most {spec.text_tokens} text tokens (got {len(ids)})")
    return [spec.bos, *ids, spec.eos] + [spec.pad] * (spec.text_tokens - len(ids))


def text_chunks(text: str, tokenize: Callable[[str], list[int]], spec: ChunkSpec) -> list[list[int]]:
    """One prompt -> its chunks of text token ids (see chunk_tokens)."""
    return chunk_tokens([list(tokenize(p)) for p in split_break(text)], spec)


def batch_chunks(texts: Sequence[str], tokenize: Callable[[str], list[int]], spec: ChunkSpec,
                 min_chunks: int = 1, cut: Optional[Callable[[str, int], None]] = None) -> list[list[list[int]]]:
    """Every text -> the same number of wrapped chunks (at least `min_chunks`), each ``spec.length``
    ids long: result[text][chunk] is one encoder input row. A text of more than MAX_CHUNKS chunks
    keeps its first MAX_CHUNKS; `cut(text, chunks it needed)` is told."""
    per_text = [text_chunks(t, tokenize, spec) for t in texts]
    for text, chunks in zip(texts, per_text):
        if len(chunks) > MAX_CHUNKS:
            if cut is not None:
                cut(text, len(chunks))
            del chunks[MAX_CHUNKS:]
    count = min(MAX_CHUNKS, max([min_chunks, *(len(c) for c in per_text)]))
    return [[wrap_chunk(c, spec) for c in chunks + [[]] * (count - len(chunks))] for chunks in per_text]


def count_chunks(texts: Sequence[str], tokenize: Callable[[str], list[int]], spec: ChunkSpec) -> int:
    """How many chunks the longest of `texts` needs."""
    return min(MAX_CHUNKS, max([1, *(len(text_chunks(t, tokenize, spec)) for t in texts)]))
