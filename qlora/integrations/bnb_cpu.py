"""bitsandbytes' CPU inference repacking, kept away from a model that trains (written for bitsandbytes 0.50.x).

On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode and without gradients converts the layer's 4-bit weight,
in place and for good, into the layout of its CPU inference kernel (`_convert_weight_packed_for_cpu`, which sets
`quant_state.packing_format_for_cpu`); every later forward, training included, then goes through that kernel. A
model that answers prompts or is evaluated and then trains on (a DPO stage's starting policy answering its prompts,
a sweep trial's eval loss mid-training) would train through an inference kernel: Qwen2's biased projections fail
there at once ("a view of a leaf Variable that requires grad is being used in an in-place operation", measured on
an AVX512-BF16 EPYC). `no_inference_repacking(model)` turns the conversion off for the block, through the attribute
bitsandbytes reads (`support_avx512bf16_for_cpu`, set in `Linear4bit.__init__`), and puts it back afterwards.
tests/test_integrations.py breaks if bitsandbytes renames it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

WRITTEN_FOR = {"bitsandbytes": "0.50.2"}
REPACKING_SWITCH = "support_avx512bf16_for_cpu"


@contextlib.contextmanager
def no_inference_repacking(model) -> Iterator[None]:
    """Inside the block, no 4-bit layer of `model` converts its weight to bitsandbytes' CPU inference layout."""
    from bitsandbytes.nn import Linear4bit

    switched = [m for m in model.modules() if isinstance(m, Linear4bit) and getattr(m, REPACKING_SWITCH, False)]
    for module in switched:
        setattr(module, REPACKING_SWITCH, False)
    try:
        yield
    finally:
        for module in switched:
            setattr(module, REPACKING_SWITCH, True)
