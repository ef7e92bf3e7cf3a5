"""The engine's pure parts: token choice, cache packing, gate files (no model, no threads).

pytest tests/actors/test_engine_parts.py -q
"""

from __future__ import annotations

import pytest
import torch

from antiphon.actors import kv
from antiphon.actors.gate import load_gate, save_gate
from antiphon.actors.sampling import (
    choose_tokens,
    find_stop_string,
    new_generator,
    sample_one,
    top_alternatives,
)
from antiphon.errors import InvalidRequest
from antiphon.messages import SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0])


def test_greedy_picks_argmax_and_reports_model_logprobs():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    params = [SamplingParams(), SamplingParams()]
    tokens, logprobs, matrix = choose_tokens(logits, params, [new_generator(0)] * 2)
    assert tokens == [1, 3]
    expected = torch.log_softmax(LOGITS, -1)[1].item()
    assert logprobs == pytest.approx([expected, expected])
    assert matrix.shape == (2, 5)


def test_top_k_one_and_tiny_top_p_are_greedy():
    for params in (
        SamplingParams(temperature=2.0, top_k=1),
        SamplingParams(temperature=2.0, top_p=0.01),
    ):
        draws = {sample_one(LOGITS, params, new_generator(s)) for s in range(20)}
        assert draws == {1}


def test_top_k_and_top_p_keep_only_the_best_tokens():
    top2 = SamplingParams(temperature=5.0, top_k=2)
    assert {sample_one(LOGITS, top2, new_generator(s)) for s in range(200)} == {1, 2}
    # probabilities (t=1): ~[.08, .55, .33, .01, .03]: .55 + .33 > .8, so only 1 and 2 remain
    nucleus = SamplingParams(temperature=1.0, top_p=0.8)
    assert {sample_one(LOGITS, nucleus, new_generator(s)) for s in range(200)} == {1, 2}


def test_seeded_sampling_repeats_and_does_not_touch_its_input():
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=3)
    logits = LOGITS.clone()
    generator_a, generator_b = new_generator(5), new_generator(5)
    first = [sample_one(logits, params, generator_a) for _ in range(10)]
    second = [sample_one(logits, params, generator_b) for _ in range(10)]
    assert first == second
    assert torch.equal(logits, LOGITS)


def test_top_alternatives_best_first():
    logprobs = torch.log_softmax(LOGITS, -1)
    top = top_alternatives(logprobs, 3)
    assert [t for t, _ in top] == [1, 2, 0]
    assert top[0][1] == pytest.approx(logprobs[1].item())


def test_find_stop_string_earliest():
    assert find_stop_string("abc\n\nQ: x", ("Q:", "\n\n")) == 3
    assert find_stop_string("abc", ("d",)) is None


def layer(batch: int, length: int, fill: float) -> kv.LayerKV:
    keys = torch.full((batch, 2, length, 3), fill)
    return keys, keys + 0.5


def test_pack_left_pads_and_unpack_restores_each_row():
    rows = [[layer(1, 4, 1.0), layer(1, 4, 2.0)], [layer(1, 2, 3.0), layer(1, 2, 4.0)], []]
    cache, pads = kv.pack(rows, [4, 2, 0])
    assert pads == [0, 2, 4]
    layers = kv.layers_of(cache)
    assert layers[0][0].shape == (3, 2, 4, 3)
    assert torch.all(layers[0][0][1, :, :2] == 0)  # pads are zeros, hidden by the mask
    back = kv.unpack_row(layers, 1, 2, 4)
    assert torch.equal(back[1][1], rows[1][1][1])
    assert kv.unpack_row(layers, 2, 4, 4) == []


def test_single_row_is_not_copied_and_crop_is_a_view():
    row = [layer(1, 5, 1.0)]
    cache, pads = kv.pack([row], [5])
    assert pads == [0] and kv.layers_of(cache)[0][0] is row[0][0]
    assert kv.unpack_row(kv.layers_of(cache), 0, 0, 5)[0][0] is row[0][0]
    cropped = kv.crop(row, 3)
    assert cropped[0][0].shape[2] == 3 and cropped[0][0].data_ptr() == row[0][0].data_ptr()
    assert kv.crop(row, 0) == []


def kv_states(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, n, 4, generator=g), torch.randn(batch, 2, n, 4, generator=g)


def test_a_growing_layer_appends_in_place_and_never_changes_a_view_it_gave():
    layer = kv.GrowingLayer()
    steps = [kv_states(1, 5, 0)] + [kv_states(1, 1, s) for s in range(1, 6)]
    keys, _ = layer.update(*steps[0])
    kept = keys  # a session's view of the first 5 positions
    buffer = layer.keys.data_ptr()
    for k, v in steps[1:]:
        layer.update(k, v)
    assert layer.keys.data_ptr() == buffer  # appended into the room, no new tensor
    assert torch.equal(layer.keys, torch.cat([k for k, _ in steps], dim=2))
    assert torch.equal(layer.values, torch.cat([v for _, v in steps], dim=2))
    before = layer.keys.clone()
    layer.crop(-3)  # positions 7..9 are still seen by `before`'s owner: not to be overwritten
    seen = layer.keys
    layer.update(*kv_states(1, 2, 9))
    assert torch.equal(seen, before[:, :, :7]) and torch.equal(kept, steps[0][0])
    assert layer.keys.data_ptr() != buffer  # a crop made the next append copy
    assert torch.equal(layer.keys[:, :, :7], before[:, :, :7])


def test_a_cache_of_given_tensors_copies_them_before_its_first_append():
    held = kv_states(1, 4, 1)
    cache = kv.cache_from_layers([held])  # e.g. a forked session's tensors, shared
    keys, values = cache.update(*kv_states(1, 1, 2), layer_idx=0)
    assert keys.shape[2] == 5 and torch.equal(keys[:, :, :4], held[0])
    assert held[0].shape[2] == 4 and keys.data_ptr() != held[0].data_ptr()
    assert isinstance(kv.pack([[], []], [0, 0])[0].layer_class_to_replicate(), kv.GrowingLayer)


def test_a_cache_wrapped_again_appends_in_place_and_a_view_shared_past_the_frontier_copies():
    layer = kv.GrowingLayer()
    held = layer.update(*kv_states(1, 5, 0))  # a session's cache after its pass
    before = tuple(t.clone() for t in held)
    again = kv.cache_from_layers([held])  # its next turn wraps the same views
    keys, _ = again.update(*kv_states(1, 1, 1), layer_idx=0)
    assert keys.shape[2] == 6 and keys.data_ptr() == held[0].data_ptr()  # no copy
    assert held[0].shape[2] == 5 and torch.equal(held[0], before[0])
    sibling = kv.cache_from_layers([held])  # a fork holding the same 5 positions
    token = kv_states(1, 1, 2)
    sib_keys, sib_values = sibling.update(*token, layer_idx=0)
    assert sib_keys.data_ptr() != held[0].data_ptr()  # behind the frontier: copied
    assert torch.equal(sib_keys[:, :, :5], before[0])
    assert torch.equal(sib_values[:, :, 5:], token[1])
    assert torch.equal(keys[:, :, 5:], kv_states(1, 1, 1)[0])  # the first one's token stands


def test_gate_file_round_trip(tmp_path):
    weight = torch.arange(4, dtype=torch.float32)
    path = save_gate(tmp_path / "g.safetensors", weight, bias=-1.0)
    gate = load_gate(path, hidden_size=4)
    hidden = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert gate(hidden).tolist() == pytest.approx(torch.sigmoid(torch.tensor([-1.0, 0.0])).tolist())
    with pytest.raises(InvalidRequest, match="hidden size"):
        load_gate(path, hidden_size=8)
