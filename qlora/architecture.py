"""Checks on the base model's architecture that need no weights: the model is built on the meta device.

`target_module_problems` tells, before any weights load, whether `lora.target_modules` names layers that LoRA can
adapt. peft itself only fails when *no* entry matches: with [q_proj, not_a_module] it silently adapts q_proj alone.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path

from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline_config.schema import LoraAdapterConfig, ModelConfig

logger = logging.getLogger(__name__)

# Module types peft's LoRA can wrap that causal LMs have (peft also takes Conv2d/3d and MultiheadAttention).
# transformers' Conv1D is GPT-2's linear layer with transposed weights: leaving it out would reject GPT-2's c_attn.
ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, Conv1D)


def read_model_config(model_cfg: ModelConfig, model_path: str, gguf_file: str | None = None):
    """The model's transformers config (no weights read), or None when it cannot be read (a hub id without network,
    an unknown architecture, a broken GGUF): the model-source check reports an unreachable model."""
    from transformers import AutoConfig

    def read_config(local_files_only: bool):
        return AutoConfig.from_pretrained(
            model_path,
            gguf_file=gguf_file,
            revision=model_cfg.revision,
            token=os.environ.get(model_cfg.hub_token_env) or None,
            trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=local_files_only,
        )

    try:
        try:
            # The local folder or the HF cache first: a cached hub model without network would otherwise cost
            # half a minute of retries.
            return read_config(local_files_only=True)
        except OSError:
            if Path(model_path).is_dir():
                raise
            return read_config(local_files_only=False)
    except Exception as exc:  # advisory check
        logger.debug("cannot read the config of %s: %s", model_path, exc)
        return None


def build_meta_model(model_cfg: ModelConfig, model_path: str, gguf_file: str | None = None) -> nn.Module | None:
    """The model's module tree with its parameters on the meta device (no weights read or allocated), or None
    when its config cannot be read or the model not built."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = read_model_config(model_cfg, model_path, gguf_file)
    if config is None:
        return None
    try:
        # Parameters go to the meta device; buffers (rotary frequencies) stay real because some model __init__s
        # compute with them, which fails on meta tensors.
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as exc:  # advisory check
        logger.debug("cannot build %s on the meta device: %s", model_path, exc)
        return None


def context_length(config) -> int | None:
    """Positions the model was built for (`max_position_embeddings` of its text part), if it says."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def peft_name_matches(entry: str, name: str) -> bool:
    """peft's rule for a list entry (peft.tuners.tuners_utils.check_target_module_exists)."""
    return name == entry or name.endswith("." + entry)


def target_module_problems(
    model_cfg: ModelConfig, lora_cfg: LoraAdapterConfig, model_path: str, gguf_file: str | None = None
) -> list[str]:
    """Problems with `lora.target_modules` for the model at `model_path`, one line each; [] when all is well.

    `model_path` is a local folder with config.json (or a hub id found in the local cache); with `gguf_file` the
    config is read from that GGUF file's metadata inside `model_path`. The architecture is built on the meta device,
    so no weights are read. Returns [] when the config cannot be read: other checks report an unreachable model.
    Entries match as in peft: a list entry matches a module whose full name equals it or ends with "." + entry; a
    plain string is a regular expression that must match a full module name; 'all-linear' always matches.
    """
    targets = lora_cfg.target_modules
    if targets == "all-linear":
        return []
    model = build_meta_model(model_cfg, model_path, gguf_file)
    if model is None:
        return []
    kind = type(model).__name__
    output_head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    adaptable = [n for n, m in modules.items() if n and isinstance(m, ADAPTABLE_TYPES)]
    linear_suffixes = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n in adaptable
            if not isinstance(modules[n], nn.Embedding) and modules[n] is not output_head
        }
    )
    listing = f"linear layers are: {', '.join(linear_suffixes)}"

    if isinstance(targets, str):
        if any(re.fullmatch(targets, n) for n in adaptable):
            return []
        return [f"lora.target_modules: regular expression {targets!r} matches no layer of {kind}; {listing}"]

    missing: list[str] = []
    not_adaptable: dict[str, str] = {}
    for entry in targets:
        if any(peft_name_matches(entry, n) for n in adaptable):
            continue
        others = sorted({type(m).__name__ for n, m in modules.items() if n and peft_name_matches(entry, n)})
        if others:
            not_adaptable[entry] = ", ".join(others)
        else:
            missing.append(entry)
    problems = []
    if missing:
        named = ", ".join(repr(e) for e in missing)
        verb = "matches" if len(missing) == 1 else "match"
        hints = [
            f"{close[0]!r} for {e!r}" for e in missing if (close := difflib.get_close_matches(e, linear_suffixes, n=1))
        ]
        hint = f" (did you mean {' and '.join(hints)}?)" if hints else ""
        problems.append(f"lora.target_modules: {named} {verb} no module of {kind}{hint}; {listing}")
    for entry, types in not_adaptable.items():
        problems.append(
            f"lora.target_modules: {entry!r} names {types} module(s) of {kind}, which LoRA cannot adapt; {listing}"
        )
    return problems
