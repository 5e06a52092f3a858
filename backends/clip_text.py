"""CLIP text encoding shared by the SD1.5- and SDXL-shaped backends: long prompts in chunks
(layerctl.core.prompts) and clip skip, the way A1111 does them.

Clip skip N (1 = the last layer, 2 = the one before, ...):

- SD1.5 (one CLIP-L): N = 1 is the encoder's output (after its final layer norm); N > 1 is the
  hidden state N layers from the end, put through the final layer norm (A1111's
  ``CLIP_stop_at_last_layers``; diffusers' ``clip_skip=N-1``).
- SDXL (CLIP-L + OpenCLIP-G): the model was trained on the penultimate hidden state of both
  encoders, without the final layer norm. N = 1 and N = 2 both give that (A1111 leaves SDXL
  alone at its default settings, Forge clamps N to at least 2, ComfyUI's -2 is the default);
  N > 2 takes the hidden state N layers from the end of both encoders, no layer norm (Forge,
  ComfyUI's CLIPSetLastLayer -N, diffusers' ``clip_skip=N-2``). The pooled embedding always comes
  from OpenCLIP-G's projected final output, of the first chunk (A1111).
"""

from __future__ import annotations

from layerctl.core.prompts import ChunkSpec, batch_chunks, count_chunks
from layerctl.errors import LayerctlError


def chunk_spec(tokenizer, encoder) -> ChunkSpec:
    """Special tokens and the window of a tokenizer / text encoder pair."""
    length = int(getattr(tokenizer, "model_max_length", 77) or 77)
    positions = int(getattr(encoder.config, "max_position_embeddings", length) or length)
    length = min(length, positions)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer(",", add_special_tokens=False).input_ids
    return ChunkSpec(bos=tokenizer.bos_token_id, eos=eos, pad=pad, length=length,
                     comma=comma[0] if len(comma) == 1 else None)


def _tokenize(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def layer_count(encoder) -> int:
    return int(encoder.config.num_hidden_layers)


def check_clip_skip(clip_skip: int, encoders) -> None:
    """1 <= clip_skip <= the layers of the smallest encoder (exit 2 otherwise)."""
    layers = min(layer_count(e) for e in encoders)
    if not 1 <= int(clip_skip) <= layers:
        raise LayerctlError(
            f"--clip-skip {clip_skip}: this model's text encoder has {layers} layers "
            f"(clip skip counts them from the end: 1 = the last, up to {layers})"
        )


def chunk_count(pairs, texts) -> int:
    """How many chunks the longest text needs on any of the (tokenizer, encoder) pairs."""
    return max(count_chunks(texts, _tokenize(tok), chunk_spec(tok, enc)) for tok, enc in pairs)


def token_ids(tokenizer, encoder, texts, chunks: int, device, cut=None):
    """texts -> LongTensor [len(texts), chunks, length] of wrapped, padded chunks."""
    import torch

    rows = batch_chunks(texts, _tokenize(tokenizer), chunk_spec(tokenizer, encoder), min_chunks=chunks, cut=cut)
    return torch.tensor(rows, dtype=torch.long, device=device)


def final_layer_norm(encoder):
    """The encoder's final layer norm (transformers 5 keeps it on the model, 4 under text_model)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def run_encoder(encoder, ids, layer: int, final_norm: bool):
    """ids [N, K, L] -> (hidden [N, K*L, D] from `layer` layers from the end (1 = last), the
    encoder's first output per chunk [N, K, ...]: pooled or projected text embeds)."""
    import torch

    n, k, length = ids.shape
    with torch.no_grad():
        out = encoder(ids.reshape(n * k, length), output_hidden_states=True)
    if layer == 1 and final_norm:
        hidden = out.last_hidden_state
    else:
        hidden = out.hidden_states[-layer]
        if final_norm:
            hidden = final_layer_norm(encoder)(hidden)
    first = out[0] if out[0].dim() == 2 else None  # CLIPTextModelWithProjection: text_embeds [N*K, P]
    first = first.reshape(n, k, -1) if first is not None else None
    return hidden.reshape(n, k * length, hidden.shape[-1]), first


def encode_sd15(tokenizer, encoder, texts, clip_skip: int, chunks: int, device, cut=None):
    """[N, K*77, D]: A1111's SD1.5 conditioning."""
    check_clip_skip(clip_skip, [encoder])
    ids = token_ids(tokenizer, encoder, texts, chunks, device, cut)
    return run_encoder(encoder, ids, int(clip_skip), final_norm=True)[0]


def encode_sdxl(pairs, texts, clip_skip: int, chunks: int, device, cut=None):
    """pairs: [(tokenizer, encoder)] in diffusers order (CLIP-L, then OpenCLIP-G with projection;
    either may be missing, as in the refiner). Returns (hidden [N, K*77, sum D], pooled [N, P])."""
    import torch

    encoders = [e for _t, e in pairs]
    check_clip_skip(clip_skip, encoders)
    layer = max(2, int(clip_skip))
    chunks = max(chunks, chunk_count(pairs, texts))  # both encoders must give the same number of chunks
    hidden, pooled = [], None
    for tok, enc in pairs:
        h, first = run_encoder(enc, token_ids(tok, enc, texts, chunks, device, cut), layer, final_norm=False)
        hidden.append(h)
        if first is not None:
            pooled = first[:, 0]  # the first chunk's pooled embedding (A1111)
    if pooled is None:
        raise LayerctlError("this SDXL model has no projecting text encoder (text_encoder_2): no pooled embedding")
    return torch.cat(hidden, dim=-1), pooled
