"""`qlora-flow bench`: training speed of three QLoRA set-ups side by side, on one device or several.

    qlora-flow bench --model llama2-7b --steps 10            (GPU; results in bench-results/)
    qlora-flow bench --model tiny --device cpu --steps 3     (CI smoke run)
    qlora-flow bench --model small --data bundled --steps 300 --variants trl_best,project  (loss curves)
    qlora-flow bench --model llama2-13b --num-processes 2 --strategy fsdp --variants project_lean
                                                             (distributed: torchrun starts one bench per GPU)

With --num-processes N the command re-launches itself through torchrun: every process runs the same variants on its
own GPU with the batch settings given (they are per process), the Trainer shards the data (DDP) or the model too
(FSDP-QLoRA, `distributed.strategy: fsdp`), tokens/s is the total over all processes, and peak memory is reported
per process. Only rank 0 writes the report.

Variants (run in this order, each on a freshly 4-bit-loaded random-weight model):
  recipe       the original recipe's settings through plain TRL SFTTrainer (pipeline_config/llama2-7b-chat-guanaco.yaml)
  trl_best     TRL's best-known QLoRA settings: bf16, all-linear r=16, bfd packing (padding-free), Liger kernels,
               gradient checkpointing, batch 8 x 2048
  project      this project's training path as the flow runs it (qlora.model + qlora.train), fast defaults
  project_lean the same with the one lean switch: training.gradient_checkpointing=true
  project_fp32 the same with lora.upcast_base_to_fp32=true (for the loss-curve check of skipping the up-casts)

Models are built locally from a named architecture (no hub access) with random weights, saved once in bf16: the
exact shape of a real model's config.json (Llama 2/3, Qwen3, Mistral, Gemma 2, and the mixtures of experts Mixtral
and Qwen3-MoE; bench/settings.py), built through `AutoConfig.for_model(model_type, ...)` with the bench tokenizer's
vocabulary. `--num-layers N` builds only N decoder layers (a whole Mixtral is 47B parameters).
Data: synthetic token rows with lengths log-uniform in [64, 1024] (speed does not depend on the token values),
or the bundled order data rendered with a real chat tokenizer (for loss curves; random 7B weights learn nothing).

Reported per variant: real tokens/s (non-pad input tokens over the timed steps' wall time, after warm-up steps),
peak GPU memory (torch.cuda.max_memory_allocated), MFU, the first steps' losses, and the loaded 4-bit weights:
torch.cuda.memory_allocated() growth over the load against the size the parameters' shapes give
(`expected_four_bit_bytes`; the ratio shows whether a MoE's experts really are in 4 bits).
MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token
  = 4 x P_frozen + 6 x P_lora + 12 x n_layers x d_attn x (sum_i L_i(L_i+1)/2) / (sum_i L_i)
(frozen weights: forward + input-gradient matmuls, 2 FLOPs per weight each, for a mixture of experts the router
and top_k of the experts, those a token goes through; LoRA weights also get weight gradients; attention: QK^T and
PV over each document's causal pairs, forward 4 d_attn FLOPs per pair per layer, backward twice that, d_attn =
query heads x head dim). Recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.settings import (  # noqa: F401
    ARCHITECTURES,
    BUILD_DEFAULTS,
    DEFAULT_VARIANTS,
    GEOMETRY,
    PROJECT_VARIANTS,
    UNSLOTH_SITE_ENV,
    UNSLOTH_VARIANTS,
    VARIANTS,
    BenchConfig,
)
from qlora.distributed import gather_per_rank
from qlora.files import atomic_folder, write_text_atomic
from qlora.integrations.liger import restore_llama_rope

# Dense bf16 tensor-core peaks from the datasheets (no sparsity), by device-name fragment.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


@dataclass
class VariantResult:
    name: str
    settings: dict
    tokens_per_s: float = 0.0
    step_time_s: float = 0.0
    tokens_per_step: float = 0.0
    peak_memory_gib: float | None = 0.0  # None on the CPU (no per-variant peak there)
    peak_reserved_gib: float = 0.0
    mfu: float | None = None
    mfu_of_measured_matmul: float | None = None
    first_losses: list[float] = field(default_factory=list)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    final_loss: float | None = None  # mean of the last 10% of logged losses
    profile: dict | None = None
    error: str | None = None
    skipped: str | None = None  # why the variant did not run (not a failure: e.g. no Unsloth environment)
    # the loaded 4-bit model's weights (project's loader): memory_allocated growth over the load (CUDA), the size
    # its parameters' shapes give (`expected_four_bit_bytes`), and their ratio
    weights_bytes: int | None = None
    four_bit_size_bytes: int | None = None
    weights_vs_four_bit: float | None = None
    load_peak_bytes: int | None = None  # the most allocated while loading (16-bit experts held at once show here)


class StepTimer(TrainerCallback):
    """Times optimizer steps warmup+1 .. warmup+timed with device syncs; optionally profiles the steps after."""

    def __init__(self, warmup: int, timed: int, device: str, profile_steps: int = 0) -> None:
        self.warmup, self.timed, self.device, self.profile_steps = warmup, timed, device, profile_steps
        self.t0 = self.t1 = 0.0
        self.tokens0 = self.tokens1 = 0
        self.peak = self.reserved = 0
        self.profiler = None

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_steps and state.global_step == self.warmup + self.timed:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == self.warmup:
            self._sync()
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
        elif step == self.warmup + self.timed:
            self._sync()
            self.t1, self.tokens1 = time.perf_counter(), state.num_input_tokens_seen
            if self.device == "cuda":
                self.peak, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        elif self.profiler is not None and step == self.warmup + self.timed + self.profile_steps:
            self._sync()
            self.profiler.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------------- model, data


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
    _free()


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


# -------------------------------------------------------------------------------------------------------- FLOPs


def experts_per_token(model) -> tuple[int, int] | None:
    """(experts per token, experts per layer) of a mixture-of-experts model (PEFT-wrapped or not), else None."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = getattr(text, "num_experts_per_tok", None)
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    return (int(top_k), int(experts)) if top_k and experts else None


def _own_matrices(module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of a module's own 2-D and 3-D weights, a 4-bit parametrized one (bitsandbytes'
    `replace_parameter_4bit`: the fused experts) by the shape it de-quantizes to."""
    from torch.nn.utils import parametrize

    found = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if parametrize.is_parametrized(module):
        for name, chain in module.parametrizations.items():
            state = next((getattr(p, "quant_state", None) for p in chain if hasattr(p, "quant_state")), None)
            found.append((name, tuple(state.shape) if state is not None else tuple(getattr(module, name).shape)))
    return found


def linear_params(model) -> tuple[int, int]:
    """(frozen weights one token is multiplied with, trainable LoRA weights) of a PEFT-wrapped 4-bit model.

    Frozen: every linear layer (the LM head included) and, outside linear layers, every matrix a token meets: a
    mixture-of-experts router (all of it) and the fused 3-D expert weights (transformers 5 keeps a MoE block's
    experts as `experts.gate_up_proj` / `experts.down_proj` of shape (experts, out, in), 4-bit parametrized by the
    loader), of which a token uses top_k of the experts. Embeddings are lookups, not matmuls: not counted."""
    routed = experts_per_token(model)
    frozen = lora = 0
    for name, module in model.named_modules():
        if "lora_" in name or "parametrizations" in name or isinstance(module, torch.nn.Embedding):
            continue
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            if not hasattr(module, "base_layer"):
                frozen += module.in_features * module.out_features
            continue
        for _, shape in _own_matrices(module):
            n = math.prod(shape)
            if len(shape) >= 3:  # fused experts: (experts, out, in)
                top_k = routed[0] if routed else shape[0]
                n = n * top_k // shape[0]
            frozen += n
    expert_lora = {}  # id(LoRA weight) -> top_k / experts, for a LoRA on fused 3-D expert weights
    for module in model.modules():
        base, param_name = getattr(module, "base_layer", None), getattr(module, "parameter_name", None)
        if base is None or not param_name or not hasattr(module, "lora_A"):
            continue
        shape = ()
        while base is not None and not shape:  # peft nests one wrapper per parameter of a module
            shape = dict(_own_matrices(base)).get(param_name, ())
            base = getattr(base, "base_layer", None)
        if len(shape) >= 3 and routed:  # peft's per-expert LoRA: a token goes through top_k of them
            for p in [*module.lora_A.parameters(), *module.lora_B.parameters()]:
                expert_lora[id(p)] = routed[0] / shape[0]
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            lora += round(p.numel() * expert_lora.get(id(p), 1))
    return frozen, lora


def is_moe(arch: dict) -> bool:
    return bool(arch.get("num_local_experts") or arch.get("num_experts"))


def attention_width(arch: dict) -> int:
    """Query heads x head dim: the width of QK^T and PV (hidden_size unless head_dim says otherwise)."""
    head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    return arch["num_attention_heads"] * head_dim


def layer_params(arch: dict, layer: int) -> dict:
    """Matrix parameters of one decoder layer: `attention` (q k v o shapes as (in, out)), `mlp` (dense MLP shapes,
    empty in a sparse layer), `experts` (all expert weights), `active_experts` (those one token uses), `router`
    (its (in, out) shape in a sparse layer)."""
    d = arch["hidden_size"]
    q, kv = attention_width(arch), attention_width(arch) * arch["num_key_value_heads"] // arch["num_attention_heads"]
    out = {"attention": [(d, q), (d, kv), (d, kv), (q, d)], "mlp": [], "experts": 0, "active_experts": 0}
    out["router"] = []
    experts = arch.get("num_local_experts") or arch.get("num_experts") or 0
    step = arch.get("decoder_sparse_step", 1) or 1
    sparse = experts and layer not in (arch.get("mlp_only_layers") or []) and (layer + 1) % step == 0
    if sparse:
        width = arch.get("moe_intermediate_size") or arch["intermediate_size"]
        out["experts"] = experts * 3 * d * width  # gate, up, down of each expert
        out["active_experts"] = arch["num_experts_per_tok"] * 3 * d * width
        out["router"] = [(d, experts)]
    else:
        ff = arch["intermediate_size"]
        out["mlp"] = [(d, ff), (d, ff), (ff, d)]  # gate up down
    return out


def architecture_params(arch: dict, r: int) -> tuple[int, int]:
    """(frozen, LoRA) parameters of an architecture with all-linear rank-r LoRA, counted as `linear_params` counts
    a loaded model: linear layers with the LM head, the router, the experts a token uses. LoRA as peft's
    'all-linear' puts it on the project's 4-bit model: every linear layer but the head and, in a mixture of
    experts, the router's weight (a peft ParamWrapper); not the 4-bit parametrized experts, which peft skips."""
    frozen = arch["hidden_size"] * arch.get("vocab_size", 32000)
    lora = 0
    for layer in range(arch["num_hidden_layers"]):
        shapes = layer_params(arch, layer)
        matrices = shapes["attention"] + shapes["mlp"] + shapes["router"]
        frozen += sum(i * o for i, o in matrices) + shapes["active_experts"]
        lora += sum(r * (i + o) for i, o in matrices)
    return frozen, lora


def flops_per_token(frozen: int, lora: int, n_layers: int, d_attention: int, lengths: list[int]) -> float:
    """Model FLOPs per real token; `d_attention` is query heads x head dim (`attention_width`). Documents here are
    at most 1024 tokens, inside every family's sliding window (Gemma 2, Mistral v0.1: 4096), so all causal pairs
    count."""
    pairs = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    return 4.0 * frozen + 6.0 * lora + 12.0 * n_layers * d_attention * pairs


# ------------------------------------------------------------------------------------------- weights in memory


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState: absmax, code (the 4-bit value table), offset, and with double
    quantization the nested state's absmax and code."""
    tensors = [getattr(state, k, None) for k in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += _quant_state_tensors(nested)
    return [t for t in tensors if torch.is_tensor(t)]


def four_bit_size(model) -> dict:
    """What a 4-bit loaded model's weights take, from its parameters' shapes: `four_bit_bytes` (every 4-bit
    stored matrix value, Linear4bit weights and the loader's parametrized experts, at half a byte),
    `quant_state_bytes` (their quantization state: absmax, value tables, offsets, nested statistics),
    `other_bytes` (parameters not in 4 bits: embeddings, LM head, norms, router, at their dtype), `total_bytes`.
    A tensor shared by several owners (tied embeddings, a shared table) counts once. Works on any device."""
    from bitsandbytes.nn import Linear4bit
    from torch.nn.utils import parametrize

    values, handled, seen = 0, set(), set()
    state_bytes = 0

    def add_state(state) -> int:
        total = 0
        for t in _quant_state_tensors(state):
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module.weight, "quant_state", None) is not None:
            values += math.prod(module.weight.quant_state.shape)
            state_bytes += add_state(module.weight.quant_state)
            handled.add(id(module.weight))
        if parametrize.is_parametrized(module):
            for chain in module.parametrizations.values():
                state = next((getattr(p, "quant_state", None) for p in chain if hasattr(p, "quant_state")), None)
                if state is not None:
                    values += math.prod(state.shape)
                    state_bytes += add_state(state)
                    handled.add(id(chain.original))
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in handled)
    four = math.ceil(values / 2)
    return {
        "four_bit_values": values,
        "four_bit_bytes": four,
        "quant_state_bytes": state_bytes,
        "other_bytes": other,
        "total_bytes": four + state_bytes + other,
    }


def expected_four_bit_bytes(model) -> int:
    """The bytes a 4-bit loaded model's weights should take (`four_bit_size`'s total): what
    torch.cuda.memory_allocated() grows by when it loads, if every matrix the loader should quantize is in 4 bits."""
    return four_bit_size(model)["total_bytes"]


def measure_load(load, device: str) -> tuple[object, dict]:
    """Run `load()` (a model loader) and return (model, weights): `four_bit_size_bytes` (expected_four_bit_bytes)
    and, on CUDA, `weights_bytes` (torch.cuda.memory_allocated() growth over the load, before any training),
    `load_peak_bytes` (the most allocated during the load) and `weights_vs_four_bit` (weights over 4-bit size: 1.0
    when everything the loader should quantize is in 4 bits)."""
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load()
    weights: dict = {"four_bit_size_bytes": expected_four_bit_bytes(model), "weights_bytes": None}
    if device == "cuda":
        torch.cuda.synchronize()
        weights["weights_bytes"] = torch.cuda.memory_allocated() - before
        weights["load_peak_bytes"] = torch.cuda.max_memory_allocated() - before  # the 16-bit experts, if all at once
    weights["weights_vs_four_bit"] = (
        weights["weights_bytes"] / weights["four_bit_size_bytes"] if weights["weights_bytes"] else None
    )
    return model, weights


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if fragment in name:
            return tflops
    return None


def measured_matmul_tflops(device: str) -> float | None:
    """A large bf16 matmul's rate on this device: the practical ceiling."""
    if device != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 20
    del a, b
    return 2 * n**3 / seconds / 1e12


# ------------------------------------------------------------------------------------------------ packing check


def packed_vs_unpacked_loss(model, docs: list[list[int]], pad_token_id: int, device: str) -> dict:
    """Mean next-token loss of `docs` packed padding-free into one row (the collator SFTTrainer uses with bfd
    packing) and of each document on its own; equal when documents cannot see each other."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    packed = {
        k: v.to(device) if torch.is_tensor(v) else v for k, v in collator([{"input_ids": d} for d in docs]).items()
    }
    model.train()  # the training path (bitsandbytes' CPU eval mode repacks weights); no dropout in these layers
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits.float()
        labels = packed["labels"]
        packed_sum = torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"
        ).item()
        count = int((labels[0, 1:] != -100).sum())
        single_sum = 0.0
        for doc in docs:
            ids = torch.tensor([doc], device=device)
            out = model(input_ids=ids).logits.float()
            single_sum += torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum").item()
    packed_loss, single_loss = packed_sum / count, single_sum / sum(len(d) - 1 for d in docs)
    return {"packed": packed_loss, "per_document": single_loss, "abs_diff": abs(packed_loss - single_loss)}


def packing_check(cfg: BenchConfig, model_dir: Path, tokenizer, rows, device: str) -> dict:
    """The packed-vs-unpacked loss of the project's model set-up (its attention kernel), LoRA weights random."""
    from peft import get_peft_model

    from qlora.integrations.attention import packed_training_attention, resolve_attention
    from qlora.model import build_lora_config, load_quantized_model
    from qlora.model_source import resolve_model_source

    pcfg = project_config(cfg, model_dir, str(Path(cfg.out_dir) / "packing-check"), device)  # nothing is written
    model = load_quantized_model(resolve_model_source(pcfg.model), pcfg.quantization, device, pcfg.training.attention)
    lora = build_lora_config(pcfg.lora)
    lora.init_lora_weights = False  # random B too, so the adapter path changes the output
    model = get_peft_model(model, lora)
    docs = rows[:8]
    with packed_training_attention(model, resolve_attention(pcfg.training.attention, device), padding_free=True):
        result = packed_vs_unpacked_loss(model, docs, tokenizer.pad_token_id, device)
        result["attention"] = model.config._attn_implementation
    result["documents"] = [len(d) for d in docs]
    del model
    _free()
    return result


# ---------------------------------------------------------------------------------------------------- variants


def _bench_training(cfg: BenchConfig, device: str) -> dict:
    """Training settings every variant shares: the step count, a log line per step, no saving, the seed."""
    return {
        "max_steps": cfg.warmup_steps + cfg.steps + cfg.profile_steps,
        "learning_rate": cfg.learning_rate,
        "logging_steps": 1,
        "save_steps": 0,
        "resume": "never",
        "seed": cfg.seed,
        "device": device,
    }


def recipe_config(cfg: BenchConfig, model_dir: Path, out_dir: str, device: str):
    """The original recipe: pipeline_config/llama2-7b-chat-guanaco.yaml itself, on the bench's model and steps."""
    from pipeline_config.schema import CONFIG_DIR, load_pipeline_config

    overrides = {f"training.{k}": v for k, v in _bench_training(cfg, device).items()}
    overrides |= {"model.name_or_path": str(model_dir), "data.source": "bench:synthetic"}
    overrides["training.output_dir"] = out_dir
    if device != "cuda":
        overrides["training.optim"] = "adamw_torch"  # paged optimizers need CUDA
    if needs_eager_attention(architecture(cfg)):
        overrides["training.attention"] = "eager"
    return load_pipeline_config(CONFIG_DIR / "llama2-7b-chat-guanaco.yaml", overrides)


def needs_eager_attention(arch: dict) -> bool:
    """Gemma 2's attention logit soft-capping: transformers refuses SDPA for it and loads it eager."""
    return bool(arch.get("attn_logit_softcapping"))


def trl_best_config(cfg: BenchConfig, model_dir: Path, out_dir: str, device: str):
    """TRL's documented best QLoRA settings (SFT docs: packing + padding-free, Liger, bf16, checkpointing)."""
    from pipeline_config.schema import load_pipeline_config

    bf16 = device == "cuda" or torch.cpu._is_avx512_bf16_supported()
    # Dropout 0.05, except on a mixture of experts: there peft's 'all-linear' also wraps the router's weight in a
    # ParamWrapper, which refuses any dropout ("lora.ParamWrapper does not work with lora_dropout != 0").
    dropout = 0.0 if is_moe(architecture(cfg)) else 0.05
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"compute_dtype": "bfloat16", "double_quant": True, "quant_storage_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32, "dropout": dropout, "target_modules": "all-linear"},
        "data": {"source": "bench:synthetic"},
        "training": {
            **_bench_training(cfg, device),
            "output_dir": out_dir,
            "per_device_train_batch_size": max(1, cfg.tokens_per_step // cfg.seq_len),
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": True,
            "max_seq_length": cfg.seq_len,
            "packing": True,
            "packing_strategy": "bfd",
            "bf16": bf16,
            "liger_kernels": "auto",
            # flash-attn is not installable offline; the Hub kernels need network. Eager where SDPA cannot compute
            # the family's attention (Gemma 2's soft-capping), as transformers itself picks.
            "attention": "eager" if needs_eager_attention(architecture(cfg)) else "sdpa",
            "fused_lora": False,
            "optim": "adamw_torch",
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.03,
        },
    }
    return load_pipeline_config(raw)


def run_plain_trl(pipeline_cfg, tokenizer, dataset, device, timer, weights: dict | None = None):
    """Variants (1) and (2): the project's loader and LoRA/SFT settings builders, then plain trl.SFTTrainer: none of
    the project's training code (no varlen attention, fused LoRA, partial checkpointing or atomic checkpoints).
    `weights` gets the loaded model's weight sizes (`measure_load`). Liger's kernels are off for a family they do
    not train correctly under peft (mixture-of-experts), as the project's trainer does."""
    from trl import SFTTrainer

    from qlora.model import build_lora_config, load_base_for_training
    from qlora.model_source import resolve_model_source
    from qlora.train import build_sft_config, liger_unsupported, loss_history, use_liger_kernels

    t = pipeline_cfg.training
    source = resolve_model_source(pipeline_cfg.model)
    model, loaded = measure_load(lambda: load_base_for_training(source, pipeline_cfg, device), device)
    if weights is not None:
        weights.update(loaded)
    overrides = {"disable_tqdm": True}
    if use_liger_kernels(t.liger_kernels, device) and (reason := liger_unsupported(model.config)):
        overrides["use_liger_kernel"] = False
        if weights is not None:
            weights["liger_off"] = reason
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(t, device, t.output_dir, **overrides),
        train_dataset=dataset,
        peft_config=build_lora_config(pipeline_cfg.lora),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return trainer.model, loss_history(trainer), trainer


def project_config(cfg: BenchConfig, model_dir: Path, out_dir: str, device: str, extra: tuple[str, ...] = ()):
    """The PipelineConfig the project variants train with: the schema's fast defaults plus the bench's batch
    geometry, validated exactly like a flow run's config (so `--project-set` typos fail the same way)."""
    from pipeline_config.schema import load_pipeline_config

    micro_rows = max(1, cfg.project_micro_batch_tokens // cfg.seq_len)
    accumulation = max(1, cfg.tokens_per_step // (micro_rows * cfg.seq_len))
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"compute_dtype": "bfloat16", "double_quant": True},
        "data": {"source": "bench:synthetic"},
        "training": {
            **_bench_training(cfg, device),
            "output_dir": out_dir,
            "per_device_train_batch_size": micro_rows,
            "gradient_accumulation_steps": accumulation,
            "max_seq_length": cfg.seq_len,
            "warmup_ratio": 0.03,
        },
    }
    if cfg.num_processes > 1:
        raw["distributed"] = {"num_processes": cfg.num_processes, "strategy": cfg.strategy}
        if cfg.strategy == "fsdp":  # FSDP shards the 4-bit weights only when they are stored in the compute dtype
            raw["quantization"]["quant_storage_dtype"] = "bfloat16"
            raw["training"]["bf16"] = True  # FSDP casts each layer's gathered weights to the compute dtype
    return load_pipeline_config(raw, [*extra, *cfg.project_overrides])


def run_project(cfg, pipeline_cfg, tokenizer, dataset, device, timer, weights: dict | None = None):
    """Variant (3): exactly the flow's load-quantized-model -> train-adapter functions; `weights` gets the loaded
    model's weight sizes (`measure_load`)."""
    from qlora.data import DatasetSplits
    from qlora.model import load_base_for_training
    from qlora.model_source import resolve_model_source
    from qlora.train import train_adapter

    t = pipeline_cfg.training
    source = resolve_model_source(pipeline_cfg.model)
    model, loaded = measure_load(lambda: load_base_for_training(source, pipeline_cfg, device), device)
    if weights is not None:
        weights.update(loaded)
    splits = DatasetSplits(train=dataset, eval=dataset.select(range(1)), kind="text", digest="bench", source="bench")
    fsdp = pipeline_cfg.distributed.strategy == "fsdp" and world_size() > 1
    result = train_adapter(
        model, splits, tokenizer, pipeline_cfg.lora, t, device, extra_callbacks=[timer], fsdp=fsdp, disable_tqdm=True
    )
    if fsdp:
        shares = gather_per_rank(result.metrics["fsdp_local_parameter_share"])  # every rank takes part
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[bench] FSDP: share of the parameters each process holds: {shares}", file=sys.stderr, flush=True)
        check_adapter_reloads(pipeline_cfg, result, device)
    return result.model, result.loss_history, None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_adapter_reloads(pipeline_cfg, result, device: str) -> None:
    """FSDP: the adapter gathered from the shards is one ordinary PEFT adapter: rank 0 saves it and loads it back
    onto the 4-bit base on its one GPU with `PeftModel.from_pretrained`, and the weights must be the ones trained."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from qlora.model import load_base_for_training, load_trained_adapter
    from qlora.model_source import resolve_model_source
    from qlora.train import save_trained_adapter

    folder = tempfile.mkdtemp(prefix="qlora-bench-adapter-")
    try:
        save_trained_adapter(result, folder)
        trained = {k: v.float() for k, v in result.adapter_state_dict.items()}
        base = load_base_for_training(resolve_model_source(pipeline_cfg.model), pipeline_cfg, device)
        reloaded = load_trained_adapter(base, folder, result.adapter_dtype)
        loaded = {k: p.detach().float().cpu() for k, p in reloaded.named_parameters() if "lora_" in k}
        if loaded.keys() != trained.keys():
            raise RuntimeError(
                f"the FSDP adapter reloaded with other LoRA tensors: {sorted(loaded.keys() ^ trained.keys())[:4]}"
            )
        diffs = [(loaded[k] - v).abs().max().item() for k, v in trained.items()]
        print(
            f"[bench] FSDP adapter reloaded with PeftModel.from_pretrained on one GPU: {len(loaded)} LoRA tensors, "
            f"max |reloaded - trained| = {max(diffs):.3g}",
            file=sys.stderr,
            flush=True,
        )
        if max(diffs) > 0:
            raise RuntimeError("the FSDP adapter did not reload with the trained weights")
        del reloaded, base
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _free()


PROJECT_EXTRA = {
    "project": (),
    "project_lean": ("training.gradient_checkpointing=true",),
    "project_fp32": ("lora.upcast_base_to_fp32=true",),
}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def summarize_profile(prof, top: int = 25) -> dict:
    """CUDA (or CPU) self time by kernel, grouped into categories."""
    from torch.autograd import DeviceType

    averages = prof.key_averages()
    # Kernels only (operator rows would count their kernels' time a second time).
    use_cuda = any(evt.device_type == DeviceType.CUDA for evt in averages)
    rows = []
    for evt in averages:
        if use_cuda and evt.device_type != DeviceType.CUDA:
            continue
        t = evt.self_device_time_total if use_cuda else evt.self_cpu_time_total
        if t > 0:
            rows.append((evt.key, t, evt.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows) or 1.0
    categories = {
        "4-bit dequantize": ("dequant", "kdequant"),
        "attention": ("flash", "fmha", "attention", "attn", "sdpa"),
        "matmul (bf16 GEMM)": ("gemm", "gemv", "cutlass", "nvjet", "xmma", "matmul", "mm_", "addmm", "bmm"),
        "Liger / Triton": ("triton", "_rms", "swiglu", "rope", "liger"),
        "optimizer": ("adam", "multi_tensor", "foreach"),
        "loss / LM head": ("cross_entropy", "log_softmax", "logsumexp", "nll"),
        "copies / casts": ("copy", "cast", "to_copy", "convert", "cat"),
    }
    by_cat: dict[str, float] = {}
    for key, t, _ in rows:
        low = key.lower()
        cat = next((c for c, pats in categories.items() if any(p in low for p in pats)), "other elementwise")
        by_cat[cat] = by_cat.get(cat, 0.0) + t
    return {
        "clock": "device" if use_cuda else "cpu",
        "total_ms": total / 1000,
        "categories_pct": {k: round(100 * v / total, 1) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": k[:120], "ms": round(t / 1000, 2), "pct": round(100 * t / total, 1), "calls": n}
            for k, t, n in rows[:top]
        ],
    }


def run_unsloth(name: str, cfg: BenchConfig, model_dir: Path, tokenizer, rows, device: str, arch, matmul_tflops):
    """The unsloth variants: bench/unsloth_worker.py in a process of its own, with the Unsloth environment's
    packages in place of this project's (Unsloth pins older transformers and TRL; it is never a dependency here).
    Never raises: a model Unsloth cannot load or wrap (a family it does not support) is skipped with Unsloth's
    reason, any other failure is the variant's error, and the bench goes on."""
    site = cfg.unsloth_site or os.environ.get(UNSLOTH_SITE_ENV)
    if not (site or cfg.unsloth_python):
        return VariantResult(
            name=name,
            settings={},
            skipped=f"no Unsloth environment: pass --unsloth-site DIR (or set {UNSLOTH_SITE_ENV}); "
            "../shared/gpu/unsloth/build-unsloth-site.sh builds one",
        )
    if device != "cuda":
        return VariantResult(name=name, settings={}, skipped="Unsloth trains on CUDA only")
    if world_size() > 1:
        return VariantResult(name=name, settings={}, skipped="measured on one GPU only")
    try:
        return _run_unsloth_worker(name, cfg, site, model_dir, tokenizer, rows, device, arch, matmul_tflops)
    except Exception as exc:  # e.g. no such interpreter: the variant's error, not the bench's end
        return VariantResult(name=name, settings={}, error=f"{type(exc).__name__}: {exc}"[:300])


def _run_unsloth_worker(name, cfg: BenchConfig, site, model_dir: Path, tokenizer, rows, device, arch, matmul_tflops):
    if not (model_dir / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(model_dir)  # Unsloth loads the tokenizer from the model folder
    work = Path(tempfile.mkdtemp(prefix=f"qlora-bench-{name}-"))
    batch_rows = max(1, cfg.tokens_per_step // cfg.seq_len)
    spec = {
        "model_dir": str(model_dir.resolve()),
        "rows_file": str(work / "rows.json"),
        "output_dir": str(work / "out"),
        "seq_len": cfg.seq_len,
        "batch_rows": batch_rows,
        "steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "lean": name == "unsloth_lean",
        "r": 16,
        "alpha": 32,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site:
        env["PYTHONPATH"] = site
    worker = Path(__file__).with_name("unsloth_worker.py")
    try:
        (work / "rows.json").write_text(json.dumps(rows))
        (work / "spec.json").write_text(json.dumps(spec))
        cmd = [cfg.unsloth_python or sys.executable, str(worker), str(work / "spec.json")]
        found, unsupported, code = read_worker(cmd, env, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if unsupported is not None:
        return VariantResult(
            name=name, settings={}, skipped=f"Unsloth cannot run {arch.get('model_type', 'this model')}: {unsupported}"
        )
    if found is None:
        return VariantResult(name=name, settings=spec, error=f"the Unsloth process ended with code {code}")
    settings = {k: spec[k] for k in ("seq_len", "batch_rows", "lean", "r", "alpha")} | {"versions": found["versions"]}
    result = VariantResult(name=name, settings=settings)
    result.tokens_per_s, result.step_time_s = found["tokens_per_s"], found["step_time_s"]
    result.tokens_per_step = found["tokens_per_step"]
    result.peak_memory_gib, result.peak_reserved_gib = found["peak_memory_gib"], found["peak_reserved_gib"]
    frozen, lora = architecture_params(arch, 16)
    fpt = flops_per_token(frozen, lora, arch["num_hidden_layers"], attention_width(arch), [len(r) for r in rows])
    if peak_tflops(device):
        result.mfu = result.tokens_per_s * fpt / (peak_tflops(device) * 1e12)
    if matmul_tflops:
        result.mfu_of_measured_matmul = result.tokens_per_s * fpt / (matmul_tflops * 1e12)
    result.loss_history = list(enumerate(found["losses"], start=1))
    result.first_losses = [round(x, 4) for x in found["losses"][:5]]
    return result


def read_worker(cmd: list[str], env: dict, name: str) -> tuple[dict | None, str | None, int]:
    """Run the Unsloth worker, echoing its output; (its RESULT_JSON, the reason of its UNSUPPORTED_JSON: Unsloth
    could not load or wrap the model, its exit code)."""
    found = unsupported = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("RESULT_JSON "):
            found = json.loads(line.removeprefix("RESULT_JSON "))
        elif line.startswith("UNSUPPORTED_JSON "):
            unsupported = str(json.loads(line.removeprefix("UNSUPPORTED_JSON ")).get("reason", ""))[:300]
        else:
            print(f"[{name}] {line.rstrip()}"[:400], file=sys.stderr, flush=True)
    return found, unsupported, proc.wait()


def run_variant(
    name: str, cfg: BenchConfig, model_dir: Path, tokenizer, dataset, device: str, lengths, arch, matmul_tflops
):
    profile = cfg.profile_steps if name == "project" else 0
    timer = StepTimer(cfg.warmup_steps, cfg.steps, device, profile)
    bench_cfg = BenchConfig(**{**asdict(cfg), "profile_steps": profile})
    out_dir = tempfile.mkdtemp(prefix=f"qlora-bench-{name}-")
    weights: dict = {}
    _free()
    try:
        with restore_llama_rope():
            if name == "recipe":
                pcfg = recipe_config(bench_cfg, model_dir, out_dir, device)
            elif name == "trl_best":
                pcfg = trl_best_config(bench_cfg, model_dir, out_dir, device)
            else:
                pcfg = project_config(bench_cfg, model_dir, out_dir, device, PROJECT_EXTRA[name])
            if name in ("recipe", "trl_best"):
                model, losses, trainer = run_plain_trl(pcfg, tokenizer, dataset, device, timer, weights)
            else:
                model, losses, trainer = run_project(bench_cfg, pcfg, tokenizer, dataset, device, timer, weights)
            t = pcfg.training
            shown = {
                "lora": pcfg.lora.model_dump(mode="json"),
                "quantization": pcfg.quantization.model_dump(mode="json"),
                "training": {
                    k: getattr(t, k)
                    for k in (
                        "per_device_train_batch_size",
                        "gradient_accumulation_steps",
                        "max_seq_length",
                        "packing",
                        "packing_strategy",
                        "attention",
                        "liger_kernels",
                        "fused_lora",
                        "gradient_checkpointing",
                        "gradient_checkpointing_layers",
                        "bf16",
                        "optim",
                    )
                },
            }
        if weights.get("liger_off"):
            shown["training"]["liger_kernels"] = f"off: {weights['liger_off']}"
        result = VariantResult(name=name, settings=shown)
        result.weights_bytes = weights.get("weights_bytes")
        result.four_bit_size_bytes = weights.get("four_bit_size_bytes")
        result.weights_vs_four_bit = weights.get("weights_vs_four_bit")
        result.load_peak_bytes = weights.get("load_peak_bytes")
        timed = timer.t1 - timer.t0
        tokens = timer.tokens1 - timer.tokens0
        result.tokens_per_s = tokens / timed if timed > 0 else 0.0
        result.step_time_s = timed / cfg.steps
        result.tokens_per_step = tokens / cfg.steps
        peaks = gather_per_rank(timer.peak / 2**30)
        result.peak_memory_gib = max(peaks) if device == "cuda" else None
        result.peak_reserved_gib = max(gather_per_rank(timer.reserved / 2**30))
        if len(peaks) > 1:
            result.settings["peak_memory_gib_per_rank"] = [round(p, 2) for p in peaks]
        # FLOPs per token from the architecture (under FSDP the local model holds only shards)
        frozen, lora = linear_params(model) if len(peaks) == 1 else architecture_params(arch, pcfg.lora.r)
        fpt = flops_per_token(frozen, lora, arch["num_hidden_layers"], attention_width(arch), lengths)
        peak = peak_tflops(device)
        gpus = len(peaks)  # MFU per GPU: tokens/s is the total over the processes
        if peak:
            result.mfu = result.tokens_per_s * fpt / (peak * 1e12 * gpus)
        if matmul_tflops:
            result.mfu_of_measured_matmul = result.tokens_per_s * fpt / (matmul_tflops * 1e12 * gpus)
        result.settings["flops_per_token"] = fpt
        result.loss_history = losses
        result.first_losses = [round(loss, 4) for _, loss in losses[:5]]
        tail = [loss for _, loss in losses[-max(1, len(losses) // 10) :]]
        result.final_loss = sum(tail) / len(tail)
        if timer.profiler is not None:
            result.profile = summarize_profile(timer.profiler)
        del model, trainer
    except torch.cuda.OutOfMemoryError as exc:
        result = VariantResult(name=name, settings={}, error=f"CUDA out of memory: {str(exc).splitlines()[0]}")
    except Exception as exc:  # one broken variant must not cost the others' measurements
        import traceback

        traceback.print_exc()
        result = VariantResult(name=name, settings={}, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        _free()
    return result


# ------------------------------------------------------------------------------------------------------ report


def environment(device: str) -> dict:
    import bitsandbytes
    import peft
    import transformers
    import trl

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        env["liger_kernel"] = version("liger-kernel")
    except ImportError:
        env["liger_kernel"] = None
    if device == "cuda":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
    return env


def ratio(a: VariantResult | None, b: VariantResult | None) -> float | None:
    if not a or not b or not a.tokens_per_s or not b.tokens_per_s:
        return None
    return a.tokens_per_s / b.tokens_per_s


def weights_cell(v: dict) -> str:
    """'loaded / expected (ratio)' of a variant's 4-bit weights, in GiB; the expected size alone off CUDA."""
    size = v.get("four_bit_size_bytes")
    if not size:
        return "n/a"
    if not v.get("weights_bytes"):
        return f"n/a / {size / 2**30:.3g}"
    return f"{v['weights_bytes'] / 2**30:.3g} / {size / 2**30:.3g} ({v['weights_vs_four_bit']:.2f}x)"


def markdown_table(report: dict) -> str:
    moe = is_moe(report.get("architecture") or {})
    lines = [
        f"Model {report['model']} (random weights), data {report['data']}, device {report['environment']['device']}; "
        f"{report['timed_steps']} timed steps after {report['warmup_steps']} warm-up steps"
        + (
            f"; {report['num_processes']} processes ({report['strategy']}): tokens/s and tokens/step are totals, "
            "peak memory the highest process's (per process in bench.json)."
            if report.get("num_processes", 1) > 1
            else "."
        ),
        "",
        "| variant | real tokens/s | tokens/step | step s | peak mem GiB | MFU | first losses "
        "| vs recipe | vs trl_best |" + (" weights GiB / 4-bit size GiB |" if moe else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |" + (" ---: |" if moe else ""),
    ]
    by_name = {v["name"]: v for v in report["variants"]}
    for v in report["variants"]:
        if v["error"] or v.get("skipped"):
            lines.append(f"| {v['name']} | {v['error'] or 'skipped: ' + v['skipped']} | | | | | | | |" + moe * " |")
            continue
        mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "n/a"
        peak = "n/a" if v["peak_memory_gib"] is None else f"{v['peak_memory_gib']:.2f}"
        ratios = []
        for base in ("recipe", "trl_best"):
            b = by_name.get(base)
            r = v["tokens_per_s"] / b["tokens_per_s"] if b and not b["error"] and b["tokens_per_s"] else None
            ratios.append(f"{r:.2f}x" if r and v["name"] != base else "")
        lines.append(
            f"| {v['name']} | {v['tokens_per_s']:,.0f} | {v['tokens_per_step']:,.0f} | {v['step_time_s']:.3f} | "
            f"{peak} | {mfu} | {', '.join(f'{x:.3f}' for x in v['first_losses'])} | "
            f"{ratios[0]} | {ratios[1]} |" + (f" {weights_cell(v)} |" if moe else "")
        )
    finals = {v["name"]: v["final_loss"] for v in report["variants"] if v["final_loss"] is not None}
    if report["data"] == "bundled" and finals:
        shown = ", ".join(f"{k} {x:.4f}" for k, x in finals.items())
        lines += ["", f"Final loss (mean of the last 10% of steps): {shown}"]
        if "trl_best" in finals and "project" in finals:
            rel = (finals["project"] - finals["trl_best"]) / finals["trl_best"]
            lines.append(f"project vs trl_best final loss: {100 * rel:+.2f}%")
    if moe:
        lines += [
            "",
            "Weights: torch.cuda.memory_allocated() growth over the 4-bit load / the size the parameters' shapes "
            "give (4-bit matrices incl. the fused experts at 0.5 byte, their quantization state, 16-bit embeddings, "
            "head, norms, router); 1.00x = every expert in 4 bits.",
        ]
    return "\n".join(lines) + "\n"


def run_bench(cfg: BenchConfig) -> dict:
    """Build model and data, run each variant, write bench.json + bench.md under cfg.out_dir; return the report."""
    from datasets import Dataset

    from qlora.model import pick_device

    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        from qlora.errors import PipelineInputError

        raise PipelineInputError(f"unknown bench variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    device = pick_device(cfg.device)
    if cfg.strategy == "fsdp" and cfg.num_processes > 1:
        other = [v for v in cfg.variants if v not in PROJECT_VARIANTS]
        if other:
            from qlora.errors import PipelineInputError

            raise PipelineInputError(
                f"bench --strategy fsdp measures the project's path only: drop {other} from --variants"
            )
    rank = int(os.environ.get("RANK", "0"))
    if device == "cuda" and world_size() > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # each process on its own GPU
    arch = architecture(cfg)
    # Enough rows that no process runs out within the run: a short last batch of an epoch would change the batch.
    needed_tokens = (cfg.warmup_steps + cfg.steps + cfg.profile_steps + 2) * max(cfg.tokens_per_step, 8 * 1024)
    needed_tokens *= world_size()
    if cfg.data == "bundled":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir or default_tokenizer_dir())
        rows = bundled_rows(tokenizer, n_rows=max(1000, needed_tokens // 90), seed=cfg.seed)
    else:
        tokenizer = synthetic_tokenizer(32000)
        rows = synthetic_rows(needed_tokens, 32000, cfg.seed)
    dataset = Dataset.from_dict({"input_ids": rows})
    lengths = [len(r) for r in rows]
    model_dir = build_model_dir(cfg, len(tokenizer), tokenizer.bos_token_id or 1, tokenizer.eos_token_id, device)
    matmul_tflops = measured_matmul_tflops(device)
    check = None
    if cfg.check_packing:
        try:
            check = packing_check(cfg, model_dir, tokenizer, rows, device)
        except Exception as exc:  # reported, and the speed runs still happen
            import traceback

            traceback.print_exc()
            check = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if check:
        print(f"[bench] packed vs per-document loss: {check}", file=sys.stderr, flush=True)
    results = []
    for name in cfg.variants:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name in UNSLOTH_VARIANTS:
            result = run_unsloth(name, cfg, model_dir, tokenizer, rows, device, arch, matmul_tflops)
        else:
            result = run_variant(name, cfg, model_dir, tokenizer, dataset, device, lengths, arch, matmul_tflops)
        if rank:
            continue
        if result.skipped:
            print(f"[bench] {name}: skipped ({result.skipped})", file=sys.stderr, flush=True)
        else:
            print(
                f"[bench] {name}: {result.tokens_per_s:,.0f} tokens/s, peak {result.peak_memory_gib} GiB"
                + (f" ({result.error})" if result.error else ""),
                file=sys.stderr,
                flush=True,
            )
        results.append(result)
    if rank:  # rank 0 reports for all
        return {}
    by_name = {r.name: r for r in results if not r.skipped}
    report = {
        "num_processes": world_size(),
        "strategy": cfg.strategy if world_size() > 1 else None,
        "command": "qlora-flow " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv else None,
        "model": cfg.model,
        "architecture": arch,
        "data": cfg.data,
        "rows": len(rows),
        "mean_row_tokens": sum(lengths) / len(lengths),
        "timed_steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "tokens_per_step_target": cfg.tokens_per_step,
        "environment": environment(device),
        "peak_bf16_tflops": peak_tflops(device),
        "measured_matmul_tflops": matmul_tflops,
        "flops_formula": "4*P_frozen + 6*P_lora + 12*n_layers*d_attention*sum(L(L+1)/2)/sum(L) per real token "
        "(P_frozen: the weights one token is multiplied with, for a mixture of experts its router and top_k of its "
        "experts; d_attention: query heads x head dim)",
        "packing_check": check,
        "variants": [asdict(r) for r in results],
        "ratios": {
            f"{a}/{b}": ratio(by_name.get(a), by_name.get(b))
            for a in ("project", "project_lean")
            for b in ("recipe", "trl_best", "unsloth", "unsloth_lean")
            if a in by_name and b in by_name
        },
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in (("bench.json", json.dumps(report, indent=1)), ("bench.md", markdown_table(report))):
        write_text_atomic(out / fname, text)
    return report


def launch_distributed_bench(num_processes: int, argv: list[str]) -> int:
    """Run this same bench command in `num_processes` processes through torchrun (one per GPU); rank 0's output
    is shown. No launcher of our own: torchrun sets up the process group the Trainer uses."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(num_processes)]
    cmd += ["--local-ranks-filter", "0"]
    cmd += ["-m", "flows.cli", *argv]
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    print(f"[bench] launching {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env).returncode


def default_tokenizer_dir() -> str:
    """The embedded default model's tokenizer (SmolLM2, converted from the GGUF once), for bundled-data runs."""
    from pipeline_config.schema import load_pipeline_config
    from qlora.model_source import resolve_model_source

    return resolve_model_source(load_pipeline_config().model).path
