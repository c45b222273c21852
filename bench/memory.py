"""Weights in memory: the size a 4-bit loaded model's parameters should take, what a load really allocates, and
freeing the accelerator's memory between runs."""

from __future__ import annotations

import gc
import math

import torch


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState: absmax, code (the 4-bit value table), offset, and with double
    quantization the nested state's absmax and code."""
    tensors = [getattr(state, k, None) for k in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += _quant_state_tensors(nested)
    return [t for t in tensors if torch.is_tensor(t)]


def four_bit_size(model) -> dict:
    """What a 4-bit loaded model's weights take, from its parameters' shapes: `four_bit_bytes` (every 4-bit
    stored matrix value, Linear4bit weights and the loader's parametrized experts, at half a byte),
    `quant_state_bytes` (their quantization state: absmax, value tables, offsets, nested statistics),
    `other_bytes` (parameters not in 4 bits: embeddings, LM head, norms, router, at their dtype), `total_bytes`.
    A tensor shared by several owners (tied embeddings, a shared table) counts once. Works on any device."""
    from bitsandbytes.nn import Linear4bit
    from torch.nn.utils import parametrize

    values, handled, seen = 0, set(), set()
    state_bytes = 0

    def add_state(state) -> int:
        total = 0
        for t in _quant_state_tensors(state):
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module.weight, "quant_state", None) is not None:
            values += math.prod(module.weight.quant_state.shape)
            state_bytes += add_state(module.weight.quant_state)
            handled.add(id(module.weight))
        if parametrize.is_parametrized(module):
            for chain in module.parametrizations.values():
                state = next((getattr(p, "quant_state", None) for p in chain if hasattr(p, "quant_state")), None)
                if state is not None:
                    values += math.prod(state.shape)
                    state_bytes += add_state(state)
                    handled.add(id(chain.original))
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in handled)
    four = math.ceil(values / 2)
    return {
        "four_bit_values": values,
        "four_bit_bytes": four,
        "quant_state_bytes": state_bytes,
        "other_bytes": other,
        "total_bytes": four + state_bytes + other,
    }


def expected_four_bit_bytes(model) -> int:
    """The bytes a 4-bit loaded model's weights should take (`four_bit_size`'s total): what
    torch.cuda.memory_allocated() grows by when it loads, if every matrix the loader should quantize is in 4 bits."""
    return four_bit_size(model)["total_bytes"]


def measure_load(load, device: str) -> tuple[object, dict]:
    """Run `load()` (a model loader) and return (model, weights): `four_bit_size_bytes` (expected_four_bit_bytes)
    and, on CUDA, `weights_bytes` (torch.cuda.memory_allocated() growth over the load, before any training),
    `load_peak_bytes` (the most allocated during the load) and `weights_vs_four_bit` (weights over 4-bit size: 1.0
    when everything the loader should quantize is in 4 bits)."""
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load()
    weights: dict = {"four_bit_size_bytes": expected_four_bit_bytes(model), "weights_bytes": None}
    if device == "cuda":
        torch.cuda.synchronize()
        weights["weights_bytes"] = torch.cuda.memory_allocated() - before
        weights["load_peak_bytes"] = torch.cuda.max_memory_allocated() - before  # the 16-bit experts, if all at once
    weights["weights_vs_four_bit"] = (
        weights["weights_bytes"] / weights["four_bit_size_bytes"] if weights["weights_bytes"] else None
    )
    return model, weights


def free_accelerator_memory() -> None:
    """Collect garbage, return cached CUDA blocks and reset the peak statistics: the next run measures its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
