"""LoRA on 4-bit mixture-of-experts weights: peft's `target_parameters` over bitsandbytes' parametrization.

transformers 5 keeps a MoE block's experts as fused 3-D parameters (experts x out x in); qlora/model.py stores them
in 4 bits with bitsandbytes' parametrization (`replace_parameter_4bit`), de-quantized whenever read. peft adapts
such a parameter with a `ParamWrapper`, which, during the wrapper's forward, adds a second parametrization on top
(the LoRA delta, `base + B @ A * scaling` per expert) and removes it afterwards. On a parameter that already has a
parametrization, peft 0.21.2 gets two things wrong (seen on the CPU with a tiny Qwen3-MoE; Axolotl patches the same
two):

- removal: `_remove_parametrizations` only looks for `_LoraParameterProxy`, but a single adapter on a stack of
  experts registers a `_LoraFactorsProxy`; it warns "Could not find any LoRA parametrization", the proxy stays, and
  every later forward stacks one more delta on the experts (and a checkpointed backward fails);
- nesting: adapting two parameters of one module (gate_up_proj and down_proj) nests two wrappers, and the outer
  one opens `parametrize.cached()` before the inner registers its proxy; registering on a parametrized tensor
  reads it, which caches the value without the inner delta, so the inner LoRA is never applied and gets no
  gradient.

`patch_expert_lora` replaces those two `ParamWrapper` methods with versions that remove either proxy class and
drop the stale cache entry. Written for peft 0.21.2 (torch 2.13's `parametrize._cache`, keyed by
(id(module), name)); tests/test_integrations.py checks the names, tests/test_families.py the behaviour (both expert
LoRAs get gradients, two forwards agree, the adapter reloads and merges).
"""

from __future__ import annotations

import contextlib

WRITTEN_FOR = {"peft": "0.21.2", "torch": "2.13.0"}

_PATCHED = "_qlora_expert_lora"


def patch_expert_lora() -> None:
    """Make peft's ParamWrapper correct over an already-parametrized (4-bit) parameter. Idempotent."""
    from peft.tuners.lora import layer as lora_layer
    from torch.nn.utils import parametrize

    wrapper = lora_layer.ParamWrapper
    if getattr(wrapper, _PATCHED, False):
        return
    proxies = (lora_layer._LoraParameterProxy, lora_layer._LoraFactorsProxy)
    activate = wrapper._activate_lora

    def remove_lora_proxy(self) -> None:
        base_layer = self.get_base_layer()
        chain = base_layer.parametrizations[self.parameter_name]
        if len(chain) == 1:
            parametrize.remove_parametrizations(base_layer, self.parameter_name, leave_parametrized=False)
            return
        for index in reversed(range(len(chain))):  # the newest LoRA proxy: the 4-bit one underneath stays
            if isinstance(chain[index], proxies):
                del chain[index]
                return
        raise RuntimeError(f"no LoRA parametrization to remove on {self.parameter_name}")

    @contextlib.contextmanager
    def activate_lora(self, active_adapters):
        with activate(self, active_adapters):
            key = (id(self.get_base_layer()), self.parameter_name)
            parametrize._cache.pop(key, None)  # cached before this wrapper's delta was registered
            try:
                yield
            finally:
                parametrize._cache.pop(key, None)

    wrapper._remove_parametrizations = remove_lora_proxy
    wrapper._activate_lora = activate_lora
    setattr(wrapper, _PATCHED, True)
