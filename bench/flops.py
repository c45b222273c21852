"""Counting what a token costs: the parameters it is multiplied with, its model FLOPs, and the device's peak rate.

MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token
  = 4 x P_frozen + 6 x P_lora + 12 x n_layers x d_attn x (sum_i L_i(L_i+1)/2) / (sum_i L_i)
(frozen weights: forward + input-gradient matmuls, 2 FLOPs per weight each, for a mixture of experts the router
and top_k of the experts, those a token goes through; LoRA weights also get weight gradients; attention: QK^T and
PV over each document's causal pairs, forward 4 d_attn FLOPs per pair per layer, backward twice that, d_attn =
query heads x head dim). Recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import math

import torch

# Dense bf16 tensor-core peaks from the datasheets (no sparsity), by device-name fragment.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def experts_per_token(model) -> tuple[int, int] | None:
    """(experts per token, experts per layer) of a mixture-of-experts model (PEFT-wrapped or not), else None."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = getattr(text, "num_experts_per_tok", None)
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    return (int(top_k), int(experts)) if top_k and experts else None


def _own_matrices(module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of a module's own 2-D and 3-D weights, a 4-bit parametrized one (bitsandbytes'
    `replace_parameter_4bit`: the fused experts) by the shape it de-quantizes to."""
    from torch.nn.utils import parametrize

    found = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if parametrize.is_parametrized(module):
        for name, chain in module.parametrizations.items():
            state = next((getattr(p, "quant_state", None) for p in chain if hasattr(p, "quant_state")), None)
            found.append((name, tuple(state.shape) if state is not None else tuple(getattr(module, name).shape)))
    return found


def linear_params(model) -> tuple[int, int]:
    """(frozen weights one token is multiplied with, trainable LoRA weights) of a PEFT-wrapped 4-bit model.

    Frozen: every linear layer (the LM head included) and, outside linear layers, every matrix a token meets: a
    mixture-of-experts router (all of it) and the fused 3-D expert weights (transformers 5 keeps a MoE block's
    experts as `experts.gate_up_proj` / `experts.down_proj` of shape (experts, out, in), 4-bit parametrized by the
    loader), of which a token uses top_k of the experts. Embeddings are lookups, not matmuls: not counted."""
    routed = experts_per_token(model)
    frozen = lora = 0
    for name, module in model.named_modules():
        if "lora_" in name or "parametrizations" in name or isinstance(module, torch.nn.Embedding):
            continue
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            if not hasattr(module, "base_layer"):
                frozen += module.in_features * module.out_features
            continue
        for _, shape in _own_matrices(module):
            n = math.prod(shape)
            if len(shape) >= 3:  # fused experts: (experts, out, in)
                top_k = routed[0] if routed else shape[0]
                n = n * top_k // shape[0]
            frozen += n
    expert_lora = {}  # id(LoRA weight) -> top_k / experts, for a LoRA on fused 3-D expert weights
    for module in model.modules():
        base, param_name = getattr(module, "base_layer", None), getattr(module, "parameter_name", None)
        if base is None or not param_name or not hasattr(module, "lora_A"):
            continue
        shape = ()
        while base is not None and not shape:  # peft nests one wrapper per parameter of a module
            shape = dict(_own_matrices(base)).get(param_name, ())
            base = getattr(base, "base_layer", None)
        if len(shape) >= 3 and routed:  # peft's per-expert LoRA: a token goes through top_k of them
            for p in [*module.lora_A.parameters(), *module.lora_B.parameters()]:
                expert_lora[id(p)] = routed[0] / shape[0]
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            lora += round(p.numel() * expert_lora.get(id(p), 1))
    return frozen, lora


def attention_width(arch: dict) -> int:
    """Query heads x head dim: the width of QK^T and PV (hidden_size unless head_dim says otherwise)."""
    head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    return arch["num_attention_heads"] * head_dim


def layer_params(arch: dict, layer: int) -> dict:
    """Matrix parameters of one decoder layer: `attention` (q k v o shapes as (in, out)), `mlp` (dense MLP shapes,
    empty in a sparse layer), `experts` (all expert weights), `active_experts` (those one token uses), `router`
    (its (in, out) shape in a sparse layer)."""
    d = arch["hidden_size"]
    q, kv = attention_width(arch), attention_width(arch) * arch["num_key_value_heads"] // arch["num_attention_heads"]
    out = {"attention": [(d, q), (d, kv), (d, kv), (q, d)], "mlp": [], "experts": 0, "active_experts": 0}
    out["router"] = []
    experts = arch.get("num_local_experts") or arch.get("num_experts") or 0
    step = arch.get("decoder_sparse_step", 1) or 1
    sparse = experts and layer not in (arch.get("mlp_only_layers") or []) and (layer + 1) % step == 0
    if sparse:
        width = arch.get("moe_intermediate_size") or arch["intermediate_size"]
        out["experts"] = experts * 3 * d * width  # gate, up, down of each expert
        out["active_experts"] = arch["num_experts_per_tok"] * 3 * d * width
        out["router"] = [(d, experts)]
    else:
        ff = arch["intermediate_size"]
        out["mlp"] = [(d, ff), (d, ff), (ff, d)]  # gate up down
    return out


def architecture_params(arch: dict, r: int) -> tuple[int, int]:
    """(frozen, LoRA) parameters of an architecture with all-linear rank-r LoRA, counted as `linear_params` counts
    a loaded model: linear layers with the LM head, the router, the experts a token uses. LoRA as peft's
    'all-linear' puts it on the project's 4-bit model: every linear layer but the head and, in a mixture of
    experts, the router's weight (a peft ParamWrapper); not the 4-bit parametrized experts, which peft skips."""
    frozen = arch["hidden_size"] * arch.get("vocab_size", 32000)
    lora = 0
    for layer in range(arch["num_hidden_layers"]):
        shapes = layer_params(arch, layer)
        matrices = shapes["attention"] + shapes["mlp"] + shapes["router"]
        frozen += sum(i * o for i, o in matrices) + shapes["active_experts"]
        lora += sum(r * (i + o) for i, o in matrices)
    return frozen, lora


def flops_per_token(frozen: int, lora: int, n_layers: int, d_attention: int, lengths: list[int]) -> float:
    """Model FLOPs per real token; `d_attention` is query heads x head dim (`attention_width`). Documents here are
    at most 1024 tokens, inside every family's sliding window (Gemma 2, Mistral v0.1: 4096), so all causal pairs
    count."""
    pairs = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    return 4.0 * frozen + 6.0 * lora + 12.0 * n_layers * d_attention * pairs


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if fragment in name:
            return tflops
    return None


def measured_matmul_tflops(device: str) -> float | None:
    """A large bf16 matmul's rate on this device: the practical ceiling."""
    if device != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 20
    del a, b
    return 2 * n**3 / seconds / 1e12
