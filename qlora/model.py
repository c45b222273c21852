"""The 4-bit base model and the LoRA settings: one loader for the flow, the bench and the served model.

Everything comes from config: quant type, compute dtype, double quant and quant storage dtype for
`BitsAndBytesConfig`; rank, alpha, dropout and target modules for `peft.LoraConfig`, which SFTTrainer applies
(qlora/train.py).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from pipeline_config.schema import LoraAdapterConfig, PipelineConfig, QuantizationConfig
from qlora.errors import PipelineInputError
from qlora.integrations.attention import load_attention
from qlora.model_source import ModelSource, hub_token

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}


def pick_device(requested: str) -> str:
    """'cuda' when asked for or present, else 'cpu' (bitsandbytes' CPU backend does 4-bit there)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineInputError("training.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def build_bnb_config(cfg: QuantizationConfig) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
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
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        revision=source.model.revision,
        token=hub_token(source.model),
        trust_remote_code=source.model.trust_remote_code,
        quantization_config=build_bnb_config(quant_cfg),
        dtype=DTYPES[quant_cfg.compute_dtype],
        device_map={"": device},
        attn_implementation=load_attention(attention),
        use_safetensors=True,
    )
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if upcast_base_to_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


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


def build_lora_config(cfg: LoraAdapterConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
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
