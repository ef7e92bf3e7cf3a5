"""KV-cache handling for the engine, all in one place: per-session caches and batched ones.

A session keeps its cache as plain tensors, one `(keys, values)` pair per layer, each of shape
(1, H, T, D). A forward pass over several sessions needs one transformers `DynamicCache` of
shape (B, H, L, D): `pack` left-pads the sessions' caches to the longest one L (zeros, masked
out by the attention mask) and stacks them; `unpack_row` cuts one session's part back out.
A batch of one session with nothing to pad wraps the session's tensors without copying, so
a lone session decodes at the cost of a plain `model.generate`.

transformers 5 caches are lists of layer objects; `DynamicLayer.update` grows `keys` and
`values` by concatenation, a new tensor per step: a batch of L cached positions copies all L
every step. The caches here are made of `GrowingLayer`s instead, which append in place into
spare room at the end of a buffer (`Buffers`). Positions once handed out are never written
again, so sessions can still share tensors after a fork and a cropped cache can still be a
view. The views a layer hands out carry their buffers, so a session's cache wrapped again
for its next pass (its next turn) appends in place too, instead of copying its whole cache.

Only full-attention layers are handled: sliding-window and linear-attention layers keep
state that padding would corrupt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values of one layer: (1, H, T, D) each
SessionKV = list[LayerKV]  # one pair per layer; empty list: nothing cached yet


ROOM_FRACTION = 0.25  # spare positions a new buffer gets, as a share of those it holds
MIN_ROOM = 32  # ... and at least this many


BUFFERS_ATTR = "_antiphon_buffers"  # the attribute of a handed-out view naming its Buffers


@dataclass(eq=False)
class Buffers:
    """Keys and values buffers with room at the end, shared by every view cut from them.

    `frontier` counts the positions handed out so far, by any layer: only positions past it
    are written, so no view anyone holds (a fork's, a prefix another session reuses) ever
    changes."""

    keys: torch.Tensor  # (B, H, capacity, D)
    values: torch.Tensor
    frontier: int = 0

    def views(self, end: int) -> LayerKV:
        """The first `end` positions, marked as cut from these buffers."""
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        setattr(keys, BUFFERS_ATTR, self)
        setattr(values, BUFFERS_ATTR, self)
        return keys, values


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into `Buffers`: an append that fits
    writes in place. An append behind the buffers' frontier (after a crop, or by the second
    of two sessions sharing a view), or onto tensors not cut from buffers, copies into new
    buffers first (amortised: each one holds a quarter more)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: Buffers | None = None

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold these tensors (no copy); if they were cut from buffers, keep appending there."""
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        buffers = getattr(keys, BUFFERS_ATTR, None)
        if buffers is not None and getattr(values, BUFFERS_ATTR, None) is buffers:
            self._buffers = buffers

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> LayerKV:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        if not self._fits(key_states, held, end):
            self._reallocate(key_states, value_states, held, end)
        buffers = self._buffers
        buffers.keys[:, :, held:end] = key_states
        buffers.values[:, :, held:end] = value_states
        buffers.frontier = end
        self.keys, self.values = buffers.views(end)
        return self.keys, self.values

    def _fits(self, key_states: torch.Tensor, held: int, end: int) -> bool:
        """Whether the append can be written in place: into buffers this layer's tensors
        were cut from (not replaced since, e.g. by a reorder), right at their frontier, with
        room left."""
        buffers = self._buffers
        if buffers is None or held != buffers.frontier:
            return False
        return (
            end <= buffers.keys.shape[2]
            and buffers.keys.shape[0] == key_states.shape[0]
            and (held == 0 or self.keys.data_ptr() == buffers.keys.data_ptr())
        )

    def _reallocate(
        self, key_states: torch.Tensor, value_states: torch.Tensor, held: int, end: int
    ) -> None:
        capacity = end + max(MIN_ROOM, int(end * ROOM_FRACTION))
        batch, heads = key_states.shape[:2]
        keys = key_states.new_empty(batch, heads, capacity, key_states.shape[-1])
        values = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
        if held:
            keys[:, :, :held] = self.keys
            values[:, :, :held] = self.values
        self._buffers = Buffers(keys, values)


class GrowingCache(DynamicCache):
    """A DynamicCache whose layers, made on first use, are `GrowingLayer`s."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer


def cache_from_layers(layers: list[LayerKV]) -> DynamicCache:
    """A cache holding exactly these tensors (no copy). Empty list -> empty cache."""
    cache = GrowingCache()
    for keys, values in layers:
        layer = GrowingLayer()
        layer.adopt(keys, values)
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
        return GrowingCache(), pads
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
