"""Mixture-of-experts weights quantized to 4 bits as they are loaded, not after the whole model is.

from_pretrained's bitsandbytes quantization covers nn.Linear only; transformers 5 keeps a MoE block's experts as
fused 3-D parameters, which it loads in 16 bits. Quantizing them after `from_pretrained` returns (qlora/model.py,
`quantize_expert_parameters`) gets the final memory right but not the peak: every expert is on the device in 16 bits
at once first (Mixtral-8x7B: ~87 GiB). Here each expert parameter is quantized the moment transformers sets it on
its module, so at most one layer's 16-bit experts exist at a time. And transformers' allocator warm-up, which would
reserve the 16-bit size of every parameter its quantizer does not handle (the experts) up front, is skipped for such
a load. Axolotl patches the same function for the same reason (`patch_moe_quantization_on_load`).

Written for transformers 5.24: wraps `transformers.core_model_loading.set_param_for_module` (called by name from
that module's loading loop) and replaces `transformers.modeling_utils.caching_allocator_warmup` for the duration of
one load; tests/test_integrations.py checks both names and their signatures, tests/test_families.py that the experts
come out quantized identically to quantizing them after the load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

WRITTEN_FOR = {"transformers": "5.24.0"}


@contextlib.contextmanager
def quantize_experts_while_loading(quantize: Callable[[torch.nn.Module, str], None]) -> Iterator[list[str]]:
    """Within this block, every floating-point parameter of 3 or more dimensions that from_pretrained sets on a
    module is handed to `quantize(module, name)` right away. Yields the list of their names, filled as they load."""
    import transformers.core_model_loading as loading
    import transformers.modeling_utils as modeling

    quantized: list[str] = []
    set_param = loading.set_param_for_module
    warmup = modeling.caching_allocator_warmup

    def set_and_quantize(model, target_name, param_value, *args, **kwargs):
        set_param(model, target_name, param_value, *args, **kwargs)
        if param_value.dim() < 3 or not param_value.is_floating_point():
            return
        module_path, _, name = target_name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        if isinstance(module._parameters.get(name), torch.nn.Parameter):  # set as a plain parameter, not yet 4-bit
            quantize(module, name)
            quantized.append(target_name)

    loading.set_param_for_module = set_and_quantize
    modeling.caching_allocator_warmup = lambda *args, **kwargs: None
    try:
        yield quantized
    finally:
        loading.set_param_for_module = set_param
        modeling.caching_allocator_warmup = warmup
