"""Liger kernels patch transformers' Llama module for the whole process; the bench undoes the RoPE patch between
variants so that one variant's Liger does not leak into the next.

Written for liger-kernel 0.8 / transformers 5.24: Liger replaces `transformers.models.llama.modeling_llama.
apply_rotary_pos_emb` module-wide (tests/test_integrations.py checks the name still exists).
"""

from __future__ import annotations

import contextlib

WRITTEN_FOR = {"liger-kernel": "0.8.5", "transformers": "5.24.0"}


@contextlib.contextmanager
def restore_llama_rope():
    """Put back modeling_llama.apply_rotary_pos_emb as it was before the block."""
    from transformers.models.llama import modeling_llama

    saved = modeling_llama.apply_rotary_pos_emb
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = saved
