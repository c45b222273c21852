"""What `qlora-flow bench` can measure: architectures, batch geometry, variants, and one invocation's settings.

Imports nothing heavy, so the CLI can build its parser from these without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


def _shape(hidden: int, ff: int, layers: int, heads: int, kv_heads: int | None = None, **family) -> dict:
    """One ARCHITECTURES entry: the sizes every family's config.json has (`num_key_value_heads` only where it
    differs from the query heads: grouped-query attention), then the family's own fields (`model_type` among them)."""
    sizes = dict(hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads)
    return sizes | ({"num_key_value_heads": kv_heads} if kv_heads else {}) | family


# Fields two entries share: Qwen3's RoPE base, norm epsilon and context (Qwen3-8B, Qwen3-30B-A3B); Mistral's since
# v0.2, which Mixtral has too: no sliding window (v0.1 had 4096), rope_theta 1e6
_QWEN3 = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960)
_MISTRAL = dict(sliding_window=None, rope_theta=1000000.0, max_position_embeddings=32768)

# Each entry: the transformers `model_type` ("llama" when not given) and the config.json fields of its shape,
# `_shape(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads[, num_key_value_heads], **fields)`;
# the bench builds it with `AutoConfig.for_model(model_type, **BUILD_DEFAULTS | fields, vocab_size=<the bench
# tokenizer's>, ...)`, so the vocabulary (embeddings, LM head) is the bench tokenizer's, not the real model's.
ARCHITECTURES: dict[str, dict] = {
    # Llama-2-7B / 13B shapes (meta-llama/Llama-2-*-hf config.json)
    "llama2-7b": _shape(4096, 11008, 32, 32),
    "llama2-13b": _shape(5120, 13824, 40, 40),
    # Llama-2-70B width (grouped-query attention); build fewer of its 80 layers with --num-layers
    "llama2-70b": _shape(8192, 28672, 80, 64, 8),
    # meta-llama/Meta-Llama-3-8B config.json (vocabulary 128256 there)
    "llama3-8b": _shape(4096, 14336, 32, 32, 8, rope_theta=500000.0, max_position_embeddings=8192),
    # Qwen/Qwen3-8B config.json: head_dim 128, RMS-normed queries and keys (vocabulary 151936 there)
    "qwen3-8b": _shape(4096, 12288, 36, 32, 8, model_type="qwen3", head_dim=128, **_QWEN3),
    # mistralai/Mistral-7B-Instruct-v0.3 config.json (vocabulary 32768 there)
    "mistral-7b": _shape(4096, 14336, 32, 32, 8, model_type="mistral", **_MISTRAL),
    # google/gemma-2-9b-it config.json: head_dim 256 (16 x 256 > hidden 3584), logit soft-capping (attention 50,
    # final 30: SDPA cannot apply it, transformers loads it eager), a 4096-token window on every other layer, tied
    # embeddings (vocabulary 256000 there)
    "gemma2-9b": _shape(3584, 14336, 42, 16, 8, model_type="gemma2", head_dim=256, query_pre_attn_scalar=256)
    | dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096, tie_word_embeddings=True)
    | dict(hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192),
    # mistralai/Mixtral-8x7B-Instruct-v0.1 config.json: 8 experts of Mistral-7B's MLP width, 2 per token (46.7B
    # parameters, 12.9B active; vocabulary 32000 there); build a few layers with --num-layers
    "mixtral-8x7b": _shape(4096, 14336, 32, 32, 8, model_type="mixtral", **_MISTRAL)
    | dict(num_local_experts=8, num_experts_per_tok=2),
    # Qwen/Qwen3-30B-A3B config.json: 128 experts of width 768, 8 per token, every layer sparse (30.5B parameters,
    # 3.3B active; vocabulary 151936 there); intermediate_size 6144 is the dense MLP of mlp_only_layers (none
    # here); build a few layers with --num-layers
    "qwen3-30b-a3b": _shape(2048, 6144, 48, 32, 4, model_type="qwen3_moe", head_dim=128, **_QWEN3)
    | dict(moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1)
    | dict(mlp_only_layers=[], norm_topk_prob=True),
    # learns in a few hundred steps on one GPU: the loss-curve comparison
    "small": _shape(512, 1376, 8, 8),
    # CPU smoke tests (bitsandbytes' CPU kernel wants output widths in multiples of 32)
    "tiny": _shape(64, 256, 2, 4),
    "tiny-moe": _shape(64, 256, 2, 4, 2, model_type="qwen3_moe", head_dim=16)
    | dict(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
}
# What the builder passes unless the entry says otherwise (the Llama entries' saved configs as before).
BUILD_DEFAULTS = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
# Batch geometry per architecture where the defaults (16k tokens/step in 2048-token rows) do not fit: the tiny
# model is a CPU smoke test, where a 16k-token step through a 32k-vocabulary head takes ~25 s on two cores.
_CPU_GEOMETRY = dict(seq_len=1024, tokens_per_step=2048, project_micro_batch_tokens=1024, warmup_steps=1)
GEOMETRY = {"tiny": _CPU_GEOMETRY, "tiny-moe": _CPU_GEOMETRY}
VARIANTS = ("recipe", "trl_best", "project", "project_lean", "project_fp32", "unsloth", "unsloth_lean")
PROJECT_VARIANTS = ("project", "project_lean", "project_fp32")
UNSLOTH_VARIANTS = ("unsloth", "unsloth_lean")  # in a process of their own, on an Unsloth environment
DEFAULT_VARIANTS = ("recipe", "trl_best", "project", "project_lean", "unsloth", "unsloth_lean")
# Where `bench --unsloth-site` comes from when not given
UNSLOTH_SITE_ENV = "QLORA_BENCH_UNSLOTH_SITE"


@dataclass
class BenchConfig:
    """What one `qlora-flow bench` invocation measures."""

    model: str = "llama2-7b"
    device: str = "auto"
    steps: int = 10  # timed optimizer steps per variant
    warmup_steps: int = 2  # untimed steps first (allocator, kernel autotuning, Liger's Triton compiles)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    data: str = "synthetic"  # or 'bundled'
    tokenizer_dir: str | None = None  # bundled data: a saved tokenizer folder (default: the default config's)
    seq_len: int = 2048  # packed row length for trl_best / project
    tokens_per_step: int = 16384  # packed tokens per optimizer step for trl_best / project
    project_micro_batch_tokens: int = 8192  # project's micro-batch (gradient accumulation makes up the rest)
    check_packing: bool = False  # first compare the project model's packed vs per-document loss
    learning_rate: float = 2e-4
    project_overrides: tuple[str, ...] = ()  # `section.key=value` for the project variants
    model_dir: str = ".cache/bench-models"
    out_dir: str = "bench-results"
    profile_steps: int = 0  # profile this many steps of the project variant after timing
    seed: int = 0
    num_layers: int | None = None  # build only this many decoder layers of the architecture (70B width on 4 GPUs)
    num_processes: int = 1  # training processes (GPUs) through torchrun; batch settings are per process
    strategy: str = "ddp"  # with several processes: 'ddp' or 'fsdp' (FSDP-QLoRA), as distributed.strategy
    unsloth_site: str | None = None  # folder of packages with Unsloth (PYTHONPATH of the unsloth variants' process)
    unsloth_python: str | None = None  # Python interpreter for the unsloth variants (default: this one)
