"""The CLIP text tokenizer without a download: built from the byte-pair merges shipped in
layerctl/configs/clip (OpenAI CLIP's BPE file, MIT licence; see the LICENSE.txt beside it).

CLIP's vocabulary is derived from its merges: the 256 byte stand-ins, the same with ``</w>``
(end of word), one token per merge rule in order, then ``<|startoftext|>`` and
``<|endoftext|>`` (49,408 tokens). SD1.5 and SDXL's first encoder pad with ``<|endoftext|>``,
SDXL's second (OpenCLIP bigG) with ``!``.
"""

from __future__ import annotations

from functools import lru_cache

N_MERGES = 49152 - 256 - 2  # merge rules CLIP uses (the vocabulary holds 49,408 tokens)
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in byte order of the stand-in table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def bpe_path():
    """Where the shipped merges file is (inside the installed package)."""
    from importlib.resources import files

    return files("layerctl") / "configs" / "clip" / BPE_FILE


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict, list]:
    import gzip

    text = gzip.decompress(bpe_path().read_bytes()).decode("utf-8")
    lines = text.split("\n")[1 : N_MERGES + 1]  # the first line is a version header
    merges = [tuple(ln.split(" ")) for ln in lines if ln]
    if len(merges) != N_MERGES:
        raise ValueError(f"{BPE_FILE}: {len(merges)} merge rules, expected {N_MERGES}")
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77):
    """A transformers CLIPTokenizer equal to the hub's CLIP ViT-L/14 (pad ``<|endoftext|>``) or
    SDXL's ``tokenizer_2`` (pad ``!``), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length)
