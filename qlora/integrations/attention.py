"""Attention for padding-free packed batches: each packed document attends only to itself.

TRL's padding-free collator (packing with the 'bfd' strategy) concatenates the documents of a micro-batch into one
row and passes `position_ids` (restarting at 0 per document) and the document boundaries `cu_seq_lens_q/k`
without an attention mask. What then keeps documents apart depends on the attention implementation:

- 'sdpa' / 'eager': transformers detects the packing from `position_ids` and builds a dense block-diagonal
  causal mask. Correct, but the kernel still visits every (query, key) pair of the whole row: with 8,192-token rows
  of ~350-token documents that is ~20x the attention work, and SDPA cannot use its flash kernel with a mask.
- 'qlora_varlen' (registered here): torch's own variable-length flash attention
  (`torch.nn.attention.varlen.varlen_attn`, CUDA only) over the boundaries the collator already computed. No mask
  is built (transformers skips mask creation for it), no wasted pairs, no device-to-host sync per forward.

The model is loaded with transformers' pick for its family (SDPA, or eager for Gemma 2), which evaluation and
generation (padded rows with an attention mask) need; `packed_training_attention` switches it to 'qlora_varlen' only
while SFTTrainer trains on padding-free batches, and only for families varlen computes exactly: sliding-window
layers pass their window to the kernel; logit soft-capping (Gemma 2) has no varlen kernel, so such a family trains
on transformers' flex attention where it supports it (`packed_fallback`), else the loaded implementation, and the
run log says which. `resolve_attention` picks the training implementation ('auto':
varlen on CUDA when torch has it, else SDPA).

Written for transformers 5.24 / torch 2.11-2.13. Internals used (tests/test_integrations.py checks them):
`AttentionInterface.register`, `transformers.integrations.sdpa_attention.sdpa_attention_forward`, and the private
`config._attn_implementation`, toggled while training.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

WRITTEN_FOR = {"transformers": "5.24.0", "torch": "2.13.0"}
VARLEN_ATTENTION = "qlora_varlen"


def varlen_available() -> bool:
    """True when this torch has the variable-length flash attention op and a CUDA device to run it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _varlen_params() -> set[str]:
    from torch.nn.attention.varlen import varlen_attn

    return set(inspect.signature(varlen_attn).parameters)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query/key/value are [batch, heads, seq, head_dim]; returns
    [batch, seq, heads, head_dim]. Padding-free packed rows only (see `packed_training_attention`)."""
    if attention_mask is not None or query.shape[0] != 1:
        raise RuntimeError("qlora_varlen attention needs padding-free packed batches (training.packing, bfd)")
    sliding = kwargs.get("sliding_window")
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:  # one unpadded row without boundaries: a single document
        cu_seq_lens = torch.tensor([0, query.shape[2]], device=query.device, dtype=torch.int32)
        kwargs["max_length_q"] = query.shape[2]
    if not query.is_cuda or dropout > 0.0:
        if cu_seq_lens.numel() > 2:
            raise RuntimeError("qlora_varlen attention runs packed rows on CUDA without attention dropout only")
        # A single document: causal attention (within its sliding window, if the layer has one) is exact.
        n = query.shape[2]
        pos = torch.arange(n, device=query.device)
        mask = pos[None, :] <= pos[:, None]
        if sliding:
            mask &= pos[None, :] > pos[:, None] - sliding
        return sdpa_attention_forward(module, query, key, value, mask[None, None], dropout, scaling, **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    cu_seq_lens = cu_seq_lens.to(query.device, torch.int32, non_blocking=True)
    max_len = int(kwargs.get("max_length_q") or query.shape[2])
    in_dtype = query.dtype
    if in_dtype not in (torch.float16, torch.bfloat16):
        # fp32 activations (lora.upcast_base_to_fp32): flash kernels take half precision, as in transformers' own
        # flash-attention path, which casts to the autocast or weight dtype the same way.
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        query, key, value = query.to(half), key.to(half), value.to(half)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, head_dim]
    params = _varlen_params()
    # torch 2.10 spelled causality `is_causal=True`; 2.11+ takes a (left, right) window, which also expresses a
    # sliding-window layer (transformers passes `sliding_window`: a query sees itself and the sliding_window - 1
    # keys before it, as in transformers' own flash-attention path).
    if "is_causal" in params:
        extra = {"is_causal": True}
    else:
        extra = {"window_size": (sliding - 1 if sliding else -1, 0)}
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_len, max_len, scale=scaling, **extra)
    return out.unsqueeze(0).to(in_dtype), None


def register_varlen_attention() -> None:
    """Register 'qlora_varlen' with transformers (idempotent). No mask function on purpose: transformers then
    builds no mask (and runs no packed-sequence detection with its device sync) for it."""
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)


def resolve_attention(requested: str, device: str) -> str:
    """The attention implementation training uses for `training.attention` ('qlora_varlen', 'sdpa' or 'eager')."""
    if requested == "auto":
        requested = "varlen_flash" if device == "cuda" and varlen_available() else "sdpa"
    if requested == "varlen_flash":
        register_varlen_attention()
        return VARLEN_ATTENTION
    return requested


def load_attention(requested: str) -> str | None:
    """What the model is loaded with, for `training.attention`: 'sdpa' or 'eager' as asked; for 'auto' and
    'varlen_flash' (a kernel for padding-free training batches only) None, transformers' own pick for the family:
    SDPA where it has an SDPA path, else eager (Gemma 2, whose logit soft-capping SDPA cannot apply)."""
    return requested if requested in ("sdpa", "eager") else None


def varlen_unsupported(config) -> str | None:
    """Why the varlen kernel would not compute this family's attention exactly (then training keeps the loaded
    implementation, with its block-diagonal mask over the packed documents), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None):
        return "its attention logit soft-capping has no varlen kernel in torch"
    if getattr(text, "sliding_window", None) and "window_size" not in _varlen_params():
        return "its sliding-window layers need varlen_attn's window_size (torch >= 2.11)"
    return None


def packed_fallback(model: torch.nn.Module) -> str:
    """The attention a family varlen cannot compute trains its packed rows with: transformers' flex attention where
    the model supports it (Gemma 2's soft-capping as a score modifier, a block mask per document and window: no
    (query, key) score matrix is kept, where eager's over an 8k-token row took 130 GB on Gemma-2-9B and ran out of
    memory on an H200), else the loaded implementation with its dense block-diagonal mask."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    # flex's Triton templates have no kernel for 16-wide heads (a tiny test model; inductor's NoValidChoicesError
    # on an H200); real models' heads are 64-256 wide
    if getattr(model, "_supports_flex_attn", False) and torch.cuda.is_available() and head_dim >= 32:
        return "flex_attention"
    return model.config._attn_implementation


@contextlib.contextmanager
def packed_training_attention(model: torch.nn.Module, training_attention: str, padding_free: bool, log=None):
    """Use `training_attention` while training on padding-free batches; restore the loaded implementation after.
    A family varlen cannot compute exactly (`varlen_unsupported`) keeps the loaded one, and `log` says so."""
    config = model.config
    loaded = config._attn_implementation
    if training_attention != VARLEN_ATTENTION or not padding_free:
        yield
        return
    if reason := varlen_unsupported(config):
        fallback = packed_fallback(model)
        if log is not None:
            log.info("varlen attention is off for %s: %s; packed documents use %s", config.model_type, reason, fallback)
        config._attn_implementation = fallback
        try:
            yield
        finally:
            config._attn_implementation = loaded
        return
    register_varlen_attention()
    config._attn_implementation = VARLEN_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = loaded
