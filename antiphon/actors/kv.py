"""KV-cache handling for the engine, all in one place: per-session caches and batched ones.

A session keeps its cache as plain tensors, one `(keys, values)` pair per layer, each of shape
(1, H, T, D). A forward pass over several sessions needs one transformers `DynamicCache` of
shape (B, H, L, D): `pack` left-pads the sessions' caches to the longest one L (zeros, masked
out by the attention mask) and stacks them; `unpack_row` cuts one session's part back out.
A batch of one session with nothing to pad wraps the session's tensors without copying, so
a lone session decodes at the cost of a plain `model.generate`.

transformers 5 caches are lists of layer objects; `DynamicLayer.update` grows `keys` and
`values` by concatenation (new tensors, never in place), which is why sessions can share
tensors after a fork and a cropped cache can be a view.

Only full-attention layers are handled: sliding-window and linear-attention layers keep
state that padding would corrupt.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values of one layer: (1, H, T, D) each
SessionKV = list[LayerKV]  # one pair per layer; empty list: nothing cached yet


def cache_from_layers(layers: list[LayerKV]) -> DynamicCache:
    """A DynamicCache holding exactly these tensors (no copy). Empty list -> empty cache."""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def layers_of(cache: DynamicCache) -> list[LayerKV]:
    """The (keys, values) tensors of every layer of a cache, (B, H, L, D) each."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def pack(rows: list[SessionKV], lengths: list[int]) -> tuple[DynamicCache, list[int]]:
    """Stack sessions' caches into one left-padded batch cache.

    rows[i] covers lengths[i] tokens. Returns the cache (B, H, max(lengths), D) per layer and
    each row's number of left pad positions.
    """
    longest = max(lengths)
    pads = [longest - n for n in lengths]
    if longest == 0:
        return DynamicCache(), pads
    if len(rows) == 1:
        return cache_from_layers(rows[0]), pads
    # the first non-empty row gives H, D, dtype and device
    template = next(r for r, n in zip(rows, lengths, strict=True) if n > 0)
    packed: list[LayerKV] = []
    for layer_idx, (k0, v0) in enumerate(template):
        _, heads, _, k_dim = k0.shape
        v_dim = v0.shape[-1]
        keys = k0.new_zeros(len(rows), heads, longest, k_dim)
        values = v0.new_zeros(len(rows), heads, longest, v_dim)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            if n > 0:
                k, v = row[layer_idx]
                keys[i, :, longest - n :] = k[0]
                values[i, :, longest - n :] = v[0]
        packed.append((keys, values))
    return cache_from_layers(packed), pads


def unpack_row(layers: list[LayerKV], row: int, start: int, stop: int) -> SessionKV:
    """One session's cache, positions [start, stop) of batch row `row`, as (1, H, T, D) tensors.

    A slice that is the whole tensor is returned as is; any other is copied, so that a
    session does not keep a whole batch's cache alive.
    """
    if stop <= start:
        return []
    out: SessionKV = []
    for keys, values in layers:
        whole = keys.shape[0] == 1 and start == 0 and stop == keys.shape[2]
        if whole:
            out.append((keys, values))
        else:
            out.append(
                (
                    keys[row : row + 1, :, start:stop].clone(),
                    values[row : row + 1, :, start:stop].clone(),
                )
            )
    return out


def crop(kv: SessionKV, length: int) -> SessionKV:
    """The first `length` positions of a session's cache (views: tensors are never written)."""
    if length <= 0:
        return []
    if kv and kv[0][0].shape[2] == length:
        return kv
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]
