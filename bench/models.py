"""The bench's models and data: random-weight models of a named architecture, and the token rows they train on.

Models are built locally from a named architecture (no hub access) with random weights, saved once in bf16: the
exact shape of a real model's config.json (bench/settings.py), built through `AutoConfig.for_model(model_type, ...)`
with the bench tokenizer's vocabulary. Data: synthetic token rows with lengths log-uniform in [64, 1024] (speed does
not depend on the token values), or the bundled order data rendered with a real chat tokenizer (for loss curves).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bench.memory import free_accelerator_memory
from bench.settings import ARCHITECTURES, BUILD_DEFAULTS, BenchConfig
from qlora.files import atomic_folder


def architecture(cfg: BenchConfig) -> dict:
    """The named architecture (its `model_type` included), with --num-layers of its decoder layers if given."""
    arch = {"model_type": "llama", **ARCHITECTURES[cfg.model]}
    arch.setdefault("num_key_value_heads", arch["num_attention_heads"])
    if cfg.num_layers:
        arch["num_hidden_layers"] = cfg.num_layers
    return arch


def model_config(arch: dict, vocab_size: int, bos: int | None = None, eos: int | None = None):
    """The transformers config of an architecture: its model_type's config class with the entry's fields over
    BUILD_DEFAULTS, and the given vocabulary and special tokens."""
    from transformers import AutoConfig

    fields = {**BUILD_DEFAULTS, **{k: v for k, v in arch.items() if k != "model_type"}}
    return AutoConfig.for_model(
        arch.get("model_type", "llama"), **fields, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos
    )


def build_model_dir(cfg: BenchConfig, vocab_size: int, bos: int, eos: int, device: str) -> Path:
    """A random-weight model of the named architecture, saved once (bf16 safetensors) and reused. Built by one
    process under a file lock (the others of a distributed bench wait, then reuse it)."""
    from filelock import FileLock

    arch = architecture(cfg)
    layers = f"-l{cfg.num_layers}" if cfg.num_layers else ""
    out = Path(cfg.model_dir) / f"{cfg.model}{layers}-v{vocab_size}-s{cfg.seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            _build_random_model(arch, out, vocab_size, bos, eos, cfg.seed, device)
    return out


def _build_random_model(arch: dict, out: Path, vocab_size: int, bos: int, eos: int, seed: int, device: str) -> None:
    from transformers import AutoModelForCausalLM

    config = model_config(arch, vocab_size, bos, eos)
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 7B on the GPU takes seconds, on the CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with atomic_folder(out) as tmp:  # complete or absent
        model.save_pretrained(tmp, safe_serialization=True)
    del model
    free_accelerator_memory()


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids 0..vocab_size-1 (<unk>=0 doubles as pad, <s>=1, </s>=2): offline, exact size."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    return tok


def synthetic_rows(n_tokens: int, vocab_size: int, seed: int, low: int = 64, high: int = 1024) -> list[list[int]]:
    """Rows with lengths log-uniform in [low, high] until n_tokens are covered; token ids never equal pad/bos/eos."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, total = [], 0
    while total < n_tokens:
        length = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        rows.append(rng.integers(3, vocab_size, size=length).tolist())
        total += length
    return rows


def bundled_rows(tokenizer, n_rows: int, seed: int, max_len: int = 1024) -> list[list[int]]:
    """The bundled order-extraction chats, rendered with the tokenizer's chat template."""
    import random

    from qlora.bundled_data import make_order_row

    rng, rows = random.Random(seed), []
    for _ in range(n_rows):
        example = make_order_row(rng)
        ids = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=False)
        rows.append(list(ids)[:max_len])
    return rows


def is_moe(arch: dict) -> bool:
    return bool(arch.get("num_local_experts") or arch.get("num_experts"))


def needs_eager_attention(arch: dict) -> bool:
    """Gemma 2's attention logit soft-capping: transformers refuses SDPA for it and loads it eager."""
    return bool(arch.get("attn_logit_softcapping"))


def default_tokenizer_dir() -> str:
    """The embedded default model's tokenizer (SmolLM2, converted from the GGUF once), for bundled-data runs."""
    from pipeline_config.loading import load_pipeline_config
    from qlora.model_source import resolve_model_source

    return resolve_model_source(load_pipeline_config().model).path
