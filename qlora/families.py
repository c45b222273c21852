"""Which model family a run trains and which parts of the fast path apply to it, decided before any weights load.

The decisions themselves live where each concern lives: varlen attention in qlora/integrations/attention.py
(`varlen_unsupported`), Liger in qlora/train.py (`liger_unsupported`), expert quantization and expert LoRA in
qlora/model.py. This module only asks each of them about the model's config (and its module tree built on the meta
device) and says so in `qlora-flow validate` and the preflight, one line per part, with the reason where one is
off. A checkpoint this project cannot train (not a causal LM transformers can build, or weights already quantized
by another method) is refused here, with exit code 2, instead of failing while loading or mid-training.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from pipeline_config.schema import PipelineConfig
from qlora.model import is_mixture_of_experts

# Families the CI trains through the whole flow (tests/test_families.py) and whose fast path the H200 runs check;
# others that transformers builds as a causal LM are trained too, with a warning.
TESTED_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "mixtral",
    "qwen3_moe",
    "olmoe",
)


@dataclass
class FamilyReport:
    family: str  # config.model_type
    model_class: str
    mixture_of_experts: bool
    parts: list[str] = field(default_factory=list)  # one line per fast-path part: on, or off and why
    refusal: str | None = None
    warning: str | None = None

    def render(self) -> str:
        kind = "mixture of experts" if self.mixture_of_experts else "dense"
        lines = [f"family: {self.family} ({self.model_class}, {kind})"]
        lines += [f"  {part}" for part in self.parts]
        return "\n".join(lines)


def causal_lm_class_name(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, type(config).__name__.removesuffix("Config"))


def refusal(config, model_path: str) -> str | None:
    """Why this project cannot train the checkpoint (exit 2 before weights load), or None."""
    already = getattr(config, "quantization_config", None)
    if already:
        method = already.get("quant_method") if isinstance(already, dict) else getattr(already, "quant_method", None)
        return (
            f"{model_path} is already quantized ({method or 'unknown method'}): QLoRA quantizes a 16-bit base to NF4 "
            "itself; use the model's 16-bit checkpoint"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    if encoder_decoder or (
        config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None)
    ):
        return (
            f"{model_path}: model type {config.model_type!r} is not a causal language model transformers can build "
            "(AutoModelForCausalLM); this pipeline fine-tunes decoder-only chat/instruct models"
        )
    return None


def family_report(cfg: PipelineConfig, config, device: str, meta_model=None) -> FamilyReport:
    """The family of `config` (the base model's transformers config) and the fast-path parts a run of `cfg` on
    `device` uses; `meta_model` (its module tree on the meta device, optional) for the expert counts."""
    from qlora.integrations.attention import resolve_attention, varlen_unsupported
    from qlora.train import liger_unsupported, use_liger_kernels

    t = cfg.training
    moe = is_mixture_of_experts(config)
    report = FamilyReport(
        family=config.model_type,
        model_class=(getattr(config, "architectures", None) or [causal_lm_class_name(config)])[0],
        mixture_of_experts=moe,
        refusal=refusal(config, cfg.model.name_or_path),
    )
    if not report.refusal:
        report.refusal = moe_lora_problem(cfg, config)
    if config.model_type not in TESTED_FAMILIES:
        report.warning = (
            f"model family {config.model_type!r} is not one this project tests ({', '.join(TESTED_FAMILIES)}): it "
            "should train, but check the first run's loss and generations"
        )

    attention = resolve_attention(t.attention, device)
    if not t.packing:
        report.parts.append(f"attention: {attention} (packing is off: padded rows, no varlen kernel)")
    elif attention != "qlora_varlen":
        report.parts.append(f"attention: {attention} over packed rows with a block-diagonal mask (varlen is CUDA-only)")
    elif reason := varlen_unsupported(config):
        report.parts.append(
            f"attention: varlen off: {reason}; packed documents use flex attention (soft-capping as a score "
            "modifier, a block mask per document) where the family supports it, else a block-diagonal mask"
        )
    else:
        report.parts.append("attention: varlen flash over packed documents (sliding windows included)")

    try:
        liger = use_liger_kernels(t.liger_kernels, device)
    except Exception as exc:  # asked for but not installed: the config checks report it
        liger, why_not = False, str(exc)
    else:
        why_not = "training.liger_kernels is off" if t.liger_kernels is False else "CUDA only, needs liger-kernel"
    if liger and (reason := liger_unsupported(config)):
        report.parts.append(f"Liger: off: {reason}")
    elif liger and liger_has_kernels(config.model_type) is False:
        report.parts.append(f"Liger: off: liger-kernel has no kernels for {config.model_type}")
    elif liger:
        report.parts.append(f"Liger: on (liger-kernel's fused kernels for {config.model_type})")
    else:
        report.parts.append(f"Liger: off: {why_not}")

    if t.fused_lora:
        report.parts.append("fused LoRA: on every LoRA layer over a 4-bit linear")
    else:
        report.parts.append("fused LoRA: off (training.fused_lora: false)")

    if moe:
        report.parts.append(_experts_line(cfg, meta_model))
    return report


def _experts_line(cfg: PipelineConfig, meta_model) -> str:
    from qlora.model import expert_parameters

    count = len(expert_parameters(meta_model)) if meta_model is not None else None
    stored = f"{count} fused expert weights" if count is not None else "the fused expert weights"
    lora = (
        f"LoRA on {', '.join(cfg.lora.target_parameters)} (peft's per-expert LoRA, not fused)"
        if cfg.lora.target_parameters
        else "no LoRA on the experts (lora.target_parameters to add one)"
    )
    router = "; LoRA on the router too (all-linear: peft adapts it as a parameter)" if all_linear(cfg) else ""
    return f"experts: {stored} in 4 bits ({cfg.quantization.quant_type}), the router in 16 bits; {lora}{router}"


def all_linear(cfg: PipelineConfig) -> bool:
    return cfg.lora.target_modules == "all-linear"


def moe_lora_problem(cfg: PipelineConfig, config) -> str | None:
    """peft 0.21 reads 'all-linear' on a mixture-of-experts model as transformers 4's linear layers, the router
    among them, which it now adapts as a parameter (a ParamWrapper): no dropout there, and training would fail at
    its first step."""
    if is_mixture_of_experts(config) and all_linear(cfg) and cfg.lora.dropout:
        return (
            f"lora.dropout {cfg.lora.dropout}: on a mixture-of-experts model 'all-linear' includes the router, which "
            "peft adapts without dropout: set lora.dropout: 0, or list lora.target_modules (e.g. [q_proj, k_proj, "
            "v_proj, o_proj])"
        )
    return None


def liger_has_kernels(model_type: str) -> bool | None:
    """Whether liger-kernel patches this model type (None when liger-kernel is not installed)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN
