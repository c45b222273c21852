"""Steps 3 and 4: load the base model in 4-bit (bitsandbytes) and prepare it for LoRA.

Everything comes from config: quant type, compute dtype, double quant and quant storage dtype for
`BitsAndBytesConfig`; rank, alpha, dropout and target modules for `peft.LoraConfig`.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from pipeline_config.schema import LoraAdapterConfig, ModelConfig, QuantizationConfig, TrainingConfig
from tasks.attention import load_attention, resolve_attention
from tasks.errors import PipelineInputError, retry_unless_input_error
from tasks.model_source import hub_token, resolve_model_path

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
    model_cfg: ModelConfig, quant_cfg: QuantizationConfig, device: str, attention: str = "auto"
) -> PreTrainedModel:
    """The base model with its linear layers in 4-bit, on `device`; `attention` is `training.attention`."""
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_cfg),
        revision=model_cfg.revision,
        token=hub_token(model_cfg),
        trust_remote_code=model_cfg.trust_remote_code,
        quantization_config=build_bnb_config(quant_cfg),
        dtype=DTYPES[quant_cfg.compute_dtype],
        device_map={"": device},
        attn_implementation=load_attention(resolve_attention(attention, device)),
        use_safetensors=True,
    )
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def build_lora_config(cfg: LoraAdapterConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )


def wrap_lora(
    model: PreTrainedModel, lora_cfg: LoraAdapterConfig, train_cfg: TrainingConfig
) -> tuple[PreTrainedModel, LoraConfig]:
    """The model ready for LoRA + the `LoraConfig` that SFTTrainer applies with `get_peft_model`.

    With `lora.upcast_base_to_fp32` (the original recipe: TRL <= 0.7 called it inside SFTTrainer),
    `prepare_model_for_kbit_training` keeps fp32 copies of every non-4-bit weight (norms, embeddings, LM head), so
    activations run in fp32 between the 4-bit matmuls and the LM head is an fp32 matmul. Off (the default), they
    stay in the compute dtype: measured on an H100 (docs/benchmarks.md) that is most of the speed gap to TRL, and
    the loss curve is unchanged. SFTTrainer enables input gradients for checkpointing either way.
    """
    if lora_cfg.upcast_base_to_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train_cfg.gradient_checkpointing)
    return model, build_lora_config(lora_cfg)


@task(
    name="load-quantized-model",
    timeout_seconds=3600,  # a hung hub download fails and is retried instead of blocking the run
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_input_error,
)
def load_quantized_model_task(model_cfg: ModelConfig, quant_cfg: QuantizationConfig, device: str, attention: str):
    """Prefect wrapper: retried because the weight download can fail transiently. Never persisted or cached."""
    return load_quantized_model(model_cfg, quant_cfg, device, attention)


@task(name="wrap-lora", cache_policy=NO_CACHE, persist_result=False)
def wrap_lora_task(model, lora_cfg: LoraAdapterConfig, train_cfg: TrainingConfig):
    return wrap_lora(model, lora_cfg, train_cfg)
