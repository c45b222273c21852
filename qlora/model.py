"""The 4-bit base model and the LoRA settings: one loader for the flow, the bench and the served model.

Everything comes from config: quant type, compute dtype, double quant and quant storage dtype for
`BitsAndBytesConfig`; rank, alpha, dropout and target modules for `peft.LoraConfig`, which SFTTrainer applies
(qlora/train.py).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from pipeline_config.schema import LoraAdapterConfig, PipelineConfig, QuantizationConfig
from qlora.architecture import peft_name_matches
from qlora.errors import PipelineInputError
from qlora.integrations.attention import load_attention
from qlora.integrations.expert_loading import quantize_experts_while_loading
from qlora.integrations.expert_lora import patch_expert_lora
from qlora.model_source import ModelSource, hub_token

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}


def pick_device(requested: str) -> str:
    """'cuda' when asked for or present, else 'cpu' (bitsandbytes' CPU backend does 4-bit there)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineInputError("training.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (x86 AVX512-BF16 or AMX, Arm BF16). Without them torch
    emulates bf16: a 512x576x1536 matmul took 793 ms against 23 ms in fp32 on an AVX2 EPYC (2026-12-02)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(flags.split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def auto_compute_dtype(device: str) -> str:
    """quantization.compute_dtype 'auto' on `device` when no mixed precision is asked for: the fastest dtype the
    device computes in natively."""
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_computes_bf16() else "float32"


def settled_compute_dtype(cfg: PipelineConfig, device: str) -> str:
    """The compute dtype a run uses: as configured, or for 'auto' the one of training.bf16 / fp16, else the
    device's (`auto_compute_dtype`)."""
    q, t = cfg.quantization, cfg.training
    if q.compute_dtype != "auto":
        return q.compute_dtype
    if t.bf16 or t.fp16:
        return "bfloat16" if t.bf16 else "float16"
    return auto_compute_dtype(device)


def compute_dtype_of(cfg: QuantizationConfig, device: str | None = None) -> torch.dtype:
    """The torch dtype of `cfg.compute_dtype` ('auto': the device's, for a config a run did not settle)."""
    name = cfg.compute_dtype
    if name == "auto":
        name = auto_compute_dtype(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return DTYPES[name]


def build_bnb_config(cfg: QuantizationConfig, device: str | None = None) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_compute_dtype=compute_dtype_of(cfg, device),
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_quant_storage=DTYPES[cfg.quant_storage_dtype],
    )


def load_quantized_model(
    source: ModelSource,
    quant_cfg: QuantizationConfig,
    device: str,
    attention: str = "auto",
    upcast_base_to_fp32: bool = False,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """The base model with its linear layers in 4-bit, on `device`.

    `attention` is `training.attention` (the model loads with what evaluation and generation need; a training-only
    kernel is switched on by the trainer). `upcast_base_to_fp32` is `lora.upcast_base_to_fp32`: peft's
    `prepare_model_for_kbit_training` keeps fp32 copies of every non-4-bit weight (norms, embeddings, LM head), as
    the original recipe did (TRL <= 0.7 called it inside SFTTrainer). Off, they stay in the compute dtype: measured
    on an H100 (docs/benchmarks.md) that is most of the speed gap to TRL, and the loss curve is unchanged.
    """
    hub = dict(
        revision=source.model.revision,
        token=hub_token(source.model),
        trust_remote_code=source.model.trust_remote_code,
    )
    config = AutoConfig.from_pretrained(source.path, **hub)
    moe = is_mixture_of_experts(config)
    # A mixture of experts: each fused expert weight goes to 4 bits as it arrives (peak memory: one layer's experts
    # in 16 bits, not all of them); quantize_expert_parameters below then finds none left (or any the loader skipped)
    while_loading = (
        quantize_experts_while_loading(lambda module, name: _quantize_expert(module, name, quant_cfg))
        if moe
        else contextlib.nullcontext()
    )
    with while_loading:
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            **hub,
            config=config,  # read once, above
            quantization_config=build_bnb_config(quant_cfg, device),
            dtype=compute_dtype_of(quant_cfg, device),
            device_map={"": device},
            attn_implementation=load_attention(attention),
            use_safetensors=True,
        )
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    quantize_expert_parameters(model, quant_cfg)
    if upcast_base_to_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def expert_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(full name, owning module, parameter name) of every fused expert weight: the 3-D (experts x out x in)
    parameters transformers 5 stores a mixture-of-experts block's experts in."""
    found = []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 3 and param.is_floating_point():
                found.append((f"{module_name}.{name}" if module_name else name, module, name))
    return found


def quantize_expert_parameters(model: torch.nn.Module, quant_cfg: QuantizationConfig) -> int:
    """Mixture-of-experts weights in 4 bits too, with the run's quantization settings. from_pretrained's
    bitsandbytes quantization covers nn.Linear only, and leaves the fused 3-D expert parameters (most of a MoE
    model: ~90 GB of Mixtral-8x7B's weights) in 16 bits. bitsandbytes' parametrization quantizes each in place, in
    blocks of 64 values that never straddle two experts, and de-quantizes it whenever it is read (forward and
    backward); the router stays as loaded. `load_quantized_model` already quantizes them while loading; this catches
    any the loader did not set (and a model from elsewhere). Returns how many parameters it quantized."""
    experts = expert_parameters(model)
    for _, module, name in experts:
        _quantize_expert(module, name, quant_cfg)
    if experts or is_mixture_of_experts(model.config):
        patch_expert_lora()  # LoRA on the experts (lora.target_parameters) then works over the 4-bit parametrization
    return len(experts)


def _quantize_expert(module: torch.nn.Module, name: str, quant_cfg: QuantizationConfig) -> None:
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    replace_parameter_4bit(module, name, compress_statistics=quant_cfg.double_quant, quant_type=quant_cfg.quant_type)


def is_mixture_of_experts(config) -> bool:
    """Whether a transformers config describes a mixture-of-experts model (its text part, for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None))


def dequantize_expert_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Plain `dtype` expert weights again (for a merged model): the parametrization removed, its de-quantized value
    kept."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module):
            # In name order: peft nests the LoRA wrappers of a plain module's parameters in their order, and those of
            # a parametrized (4-bit) module in name order, so a merge base nests an expert adapter as training did.
            for name in sorted(module.parametrizations):
                value = getattr(module, name).detach().to(dtype)  # read through the parametrization: de-quantized
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


def four_bit_share(model: torch.nn.Module, experts_only: bool = False) -> float:
    """Share of the model's matrix weights stored in 4 bits: linear layers and fused experts (`experts_only`: the
    experts alone); the embeddings and the output head, which QLoRA keeps in 16 bits, are not counted."""
    from bitsandbytes.nn import Linear4bit
    from torch.nn.utils import parametrize

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    four, total = 0, 0
    for module in model.modules():
        if module is head or isinstance(module, torch.nn.Embedding):
            continue
        if not experts_only and isinstance(module, Linear4bit):
            n = module.weight.numel() * 2  # two 4-bit values per stored byte
            four, total = four + n, total + n
        elif not experts_only and isinstance(module, torch.nn.Linear):
            total += module.weight.numel()
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                n = module.parametrizations[name].original.numel() * 2
                four, total = four + n, total + n
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 3)
    return four / total if total else 0.0


def load_base_for_training(source: ModelSource, cfg: PipelineConfig, device: str) -> PreTrainedModel:
    """`load_quantized_model` with a run's settings (quantization, attention, fp32 up-casts, checkpointing)."""
    return load_quantized_model(
        source,
        cfg.quantization,
        device,
        cfg.training.attention,
        upcast_base_to_fp32=cfg.lora.upcast_base_to_fp32,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
    )


ALL_EXPERTS = "all-experts"


def expert_lora_targets(model: torch.nn.Module, entries: list[str]) -> list[str]:
    """The full names of the fused expert parameters `entries` (lora.target_parameters) name, in 4 bits or not.

    peft matches a parametrized (4-bit) module's parameters by their full name only, where it matches plain ones by
    suffix too; expanding here gives both the same meaning. An entry that names no expert parameter is an error."""
    from torch.nn.utils import parametrize

    names = [name for name, _, _ in expert_parameters(model)]
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            names += [f"{module_name}.{name}" for name in module.parametrizations]
    names = [n.replace(".base_layer", "") for n in names]  # a model peft has wrapped already
    found = []
    for entry in entries:
        hits = names if entry == ALL_EXPERTS else [n for n in names if peft_name_matches(entry, n)]
        if not hits:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            listing = f"its expert parameters are: {', '.join(kinds)}" if kinds else "it has no fused expert weights"
            raise PipelineInputError(
                f"lora.target_parameters: {entry!r} names no expert parameter of {type(model).__name__}; {listing}"
            )
        found += [n for n in hits if n not in found]
    return sorted(found)


def build_lora_config(cfg: LoraAdapterConfig, model: torch.nn.Module | None = None) -> LoraConfig:
    """peft's LoraConfig for the run; `model` (the base) is needed when `lora.target_parameters` names experts."""
    if cfg.target_parameters and model is None:
        raise ValueError("lora.target_parameters needs the model to resolve expert names")
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        target_parameters=expert_lora_targets(model, cfg.target_parameters) if cfg.target_parameters else None,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )


def cast_params(model, dtypes: dict) -> None:
    """Give each named parameter the dtype `dtypes` names for it (others are left alone)."""
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


def load_trained_adapter(base: PreTrainedModel, adapter_dir, adapter_dtype: str):
    """`base` with a saved LoRA adapter, in eval mode, the adapter in the dtype it was trained in (peft loads it in
    fp32)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    dtype = DTYPES[adapter_dtype]
    cast_params(model, {n: dtype for n, _ in model.named_parameters() if "lora_" in n})
    return model
