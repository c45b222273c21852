"""What `qlora-flow bench` can measure: architectures, batch geometry, variants, and one invocation's settings.

Imports nothing heavy, so the CLI can build its parser from these without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES: dict[str, dict] = {
    # Llama-2-7B / 13B shapes (meta-llama/Llama-2-*-hf config.json)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    # Llama-2-70B width (grouped-query attention); build fewer of its 80 layers with --num-layers
    "llama2-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
    # learns in a few hundred steps on one GPU: the loss-curve comparison
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    # CPU smoke test
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}
# Batch geometry per architecture where the defaults (16k tokens/step in 2048-token rows) do not fit: the tiny
# model is a CPU smoke test, where a 16k-token step through a 32k-vocabulary head takes ~25 s on two cores.
GEOMETRY = {"tiny": dict(seq_len=1024, tokens_per_step=2048, project_micro_batch_tokens=1024, warmup_steps=1)}
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
