"""Regional `torch.compile` of the decoder layers while training (`training.compile_layers`), and back to eager after.

`nn.Module.compile` compiles a layer in place; torch has no public way to undo it, and evaluation and generation
after training must run eager (generation with a KV cache would recompile per shape). Written for torch 2.11-2.13:
`nn.Module.compile` keeps the compiled call in the private attribute `_compiled_call_impl`, which `__call__` uses when
set (tests/test_integrations.py checks it).

Measured on an H100 (docs/benchmarks.md): +6.3 % tokens/s on the fast path with Liger off (dynamo cannot trace
Liger's RMSNorm autograd.Function, so compiled layers use inductor's own fused norm, SwiGLU and RoPE). Inside
activation checkpointing the compiled layers keep their activations (25.8 GiB instead of 7.5 on the lean path), so
the schema refuses the combination.
"""

from __future__ import annotations

import torch

WRITTEN_FOR = {"torch": "2.13.0"}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """`torch.compile` every decoder layer in place: the layers share one compiled graph (their modules are graph
    inputs), with dynamic shapes because packed micro-batches change length. Returns how many layers."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def uncompile_decoder_layers(model: torch.nn.Module) -> None:
    """Back to the eager forward (what `nn.Module.compile` set is dropped)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
