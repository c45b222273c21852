"""A leaner forward for peft's LoRA layers on bitsandbytes 4-bit linears (`training.fused_lora`).

peft computes `result = base(x).clone(); result = result + lora_B(lora_A(x)) * scaling`: a defensive copy, a
scaling pass and an add pass over every adapted layer's full output, forward and again in backward. On a 7B
model at 8k tokens per micro-batch those passes move ~130 GB per forward, 15% of an H100 step
(docs/benchmarks.md). Here the same sum is one GEMM with the add and the scaling in its epilogue:
`addmm(base(x), lora_A(x), lora_B.weight.T, alpha=scaling)`, no clone (nothing is modified in place).

Only the plain case is taken over: one active adapter, vanilla LoRA (no DoRA or other variant), no dropout, no
LoRA bias, no autocast, matching dtypes, adapters enabled and not merged. Anything else (evaluation of the base
with the adapter disabled, mixed-adapter batches, an fp32 up-cast model) runs peft's own forward unchanged.

Written for peft 0.21.2 / bitsandbytes 0.50.2: replaces `forward` on each LoRA layer instance and reads peft's
`LoraLayer` attributes `disable_adapters, merged, active_adapters, lora_A, lora_B, lora_variant, lora_dropout,
scaling, base_layer` (tests/test_integrations.py checks them; tests/test_fast_path.py checks fused == peft).
"""

from __future__ import annotations

import types

import torch

WRITTEN_FOR = {"peft": "0.21.2", "bitsandbytes": "0.50.2"}


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    plain = (
        not args
        and not kwargs
        and not self.disable_adapters
        and not self.merged
        and len(self.active_adapters) == 1
        and not torch.is_autocast_enabled(x.device.type)
    )
    name = self.active_adapters[0] if plain else None
    if not plain or name not in self.lora_A or name in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if not isinstance(self.lora_dropout[name], torch.nn.Identity) or lora_b.bias is not None:
        return type(self).forward(self, x, *args, **kwargs)
    if not (x.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if result.dtype != x.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    down = lora_a(x)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        down.reshape(-1, down.shape[-1]),
        lora_b.weight.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every peft LoRA layer over a bitsandbytes 4-bit linear the fused forward; returns how many."""
    from bitsandbytes.nn import Linear4bit
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), Linear4bit):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
