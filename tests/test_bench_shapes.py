"""`qlora-flow bench --model`: the shapes of current models, dense and mixture-of-experts. Each architecture builds
as its family's model with the published size of the model it copies (on the meta device: no memory, no time);
the FLOP count takes a mixture of experts' router and the top_k experts a token goes through; the 4-bit size helper
equals what a loaded model stores; a family Unsloth cannot run is skipped with Unsloth's reason."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.flops import architecture_params, linear_params
from bench.memory import expected_four_bit_bytes, four_bit_size
from bench.models import architecture, model_config, synthetic_tokenizer
from bench.report import markdown_table
from bench.settings import ARCHITECTURES, BenchConfig
from bench.unsloth_variants import run_unsloth
from bench.variants import recipe_config, trl_best_config
from tests.conftest import tiny_model_widths
from tests.test_families import FAMILIES

REPO = Path(__file__).resolve().parents[1]

# The real models' sizes (model cards), counted with their own vocabularies: (class, vocabulary, total, active)
PUBLISHED = {
    "llama3-8b": ("LlamaForCausalLM", 128256, 8.03e9, None),
    "qwen3-8b": ("Qwen3ForCausalLM", 151936, 8.19e9, None),
    "mistral-7b": ("MistralForCausalLM", 32768, 7.25e9, None),
    "gemma2-9b": ("Gemma2ForCausalLM", 256000, 9.24e9, None),
    "mixtral-8x7b": ("MixtralForCausalLM", 32000, 46.7e9, 12.9e9),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", 151936, 30.5e9, 3.3e9),
}
MOE_FAMILIES = ["qwen3_moe", "mixtral"]


def _meta_model(arch: dict, vocab_size: int):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config(arch, vocab_size, 1, 2))
    model.tie_weights()  # init_empty_weights' meta parameters lose the tie (Gemma 2 ties its embeddings)
    return model


def _routing(arch: dict) -> tuple[int, int]:
    return arch["num_experts_per_tok"], arch.get("num_local_experts") or arch["num_experts"]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_builds_as_its_family_on_the_meta_device(name):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = architecture(BenchConfig(model=name))
    model = _meta_model(arch, 32000)
    assert type(model).__name__ == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch["model_type"]]
    assert ARCHITECTURES[name].get("model_type", "llama") == model.config.model_type
    assert len(model.model.layers) == ARCHITECTURES[name]["num_hidden_layers"]
    # the formula (FSDP and Unsloth runs) counts what the loaded model's modules give
    assert linear_params(model) == (architecture_params({**arch, "vocab_size": 32000}, 16)[0], 0)
    # --num-layers builds fewer decoder layers of the same width
    fewer = architecture(BenchConfig(model=name, num_layers=1))
    assert len(_meta_model(fewer, 32000).model.layers) == 1


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_architectures_have_the_published_sizes(name):
    cls, vocab, total, active = PUBLISHED[name]
    arch = architecture(BenchConfig(model=name))
    model = _meta_model(arch, vocab)
    assert type(model).__name__ == cls
    params = list(model.parameters())  # a tied weight once
    assert sum(p.numel() for p in params) == pytest.approx(total, rel=0.02)
    experts = sum(p.numel() for p in params if p.dim() == 3)
    assert bool(experts) == (active is not None)
    if active:
        top_k, n = _routing(arch)
        used = sum(p.numel() for p in params) - experts + experts * top_k // n
        assert used == pytest.approx(active, rel=0.02)
        # FLOPs per token count exactly those: all but the embedding lookup and the norms' scales
        embeddings = model.get_input_embeddings().weight.numel()
        vectors = sum(p.numel() for p in params if p.dim() == 1)
        assert linear_params(model)[0] == used - embeddings - vectors


@pytest.fixture(scope="module")
def tiny_moe_dirs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Tiny random mixtures of experts as tests/test_families.py builds them (its widths and family settings),
    with a small synthetic vocabulary; (folder, config fields) per family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields_shared = tiny_model_widths(synthetic_tokenizer(512))
    dirs = {}
    for family in MOE_FAMILIES:
        fields = {**fields_shared, **FAMILIES[family]}
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields))
        out = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(out, safe_serialization=True)
        dirs[family] = (out, {"model_type": family, **fields})
    return dirs


def _load_4bit(model_dir: Path, double_quant: bool = True):
    from pipeline_config.schema import ModelConfig, QuantizationConfig
    from qlora.model import load_quantized_model
    from qlora.model_source import resolve_model_source

    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    return load_quantized_model(source, QuantizationConfig(compute_dtype="bfloat16", double_quant=double_quant), "cpu")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_flops_count_the_router_and_the_top_k_experts(family, tiny_moe_dirs):
    """On the project's 4-bit model with its LoRA (what the bench measures), the frozen weights one token meets
    are attention, router, top_k/experts of the fused experts and the head: as counted directly on the 16-bit
    model, and as the architecture formula gives; LoRA as peft puts it there (attention and the router)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline_config.schema import LoraAdapterConfig
    from qlora.model import build_lora_config

    model_dir, arch = tiny_moe_dirs[family]
    top_k, n = _routing(arch)
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    matrices = [(name, p) for name, p in plain.named_parameters() if p.dim() >= 2 and "embed_tokens" not in name]
    direct = sum(p.numel() if p.dim() == 2 else p.numel() * top_k // n for _, p in matrices)
    assert direct < sum(p.numel() for _, p in matrices)  # the experts a token does not use are left out

    lora_cfg = LoraAdapterConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    model = get_peft_model(_load_4bit(model_dir), build_lora_config(lora_cfg))
    frozen, lora = linear_params(model)
    assert frozen == direct
    assert lora == sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert (frozen, lora) == architecture_params({**arch, "vocab_size": plain.config.vocab_size}, 8)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expected_four_bit_bytes_is_what_the_loaded_moe_stores(family, double_quant, tiny_moe_dirs):
    """expected_four_bit_bytes (from the parameters' shapes: 4-bit values at half a byte, quantization state,
    16-bit embeddings, head, norms, router) equals the bytes of every tensor the loaded model stores; every
    attention and expert matrix is among the 4-bit values."""
    model_dir, _ = tiny_moe_dirs[family]
    model = _load_4bit(model_dir, double_quant)
    stored = {}
    for key, t in model.state_dict().items():
        if ".quant_state." in key:  # bitsandbytes' JSON description of a state, written on saving only
            continue
        stored[(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())] = t.numel() * t.element_size()
    assert expected_four_bit_bytes(model) == pytest.approx(sum(stored.values()), rel=0.01)

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    quantizable = sum(
        p.numel() for name, p in plain.named_parameters() if ("self_attn" in name and p.dim() == 2) or p.dim() == 3
    )
    size = four_bit_size(model)
    assert size["four_bit_values"] == quantizable and size["four_bit_bytes"] == quantizable // 2
    assert size["quant_state_bytes"] > 0 and size["other_bytes"] > 0


def test_trl_best_and_recipe_take_what_the_family_needs(tmp_path):
    """Gemma 2 loads eager (transformers refuses SDPA with its soft-capping); on a mixture of experts peft's
    'all-linear' wraps the router's weight, which takes no dropout."""
    gemma = BenchConfig(model="gemma2-9b")
    assert trl_best_config(gemma, tmp_path, str(tmp_path), "cpu").training.attention == "eager"
    assert recipe_config(gemma, tmp_path, str(tmp_path), "cpu").training.attention == "eager"
    assert trl_best_config(BenchConfig(model="qwen3-8b"), tmp_path, str(tmp_path), "cpu").training.attention == "sdpa"
    assert trl_best_config(BenchConfig(model="mixtral-8x7b"), tmp_path, str(tmp_path), "cpu").lora.dropout == 0.0
    assert trl_best_config(BenchConfig(model="llama3-8b"), tmp_path, str(tmp_path), "cpu").lora.dropout == 0.05


def test_a_family_unsloth_cannot_run_is_skipped_with_its_reason(tmp_path):
    """The Unsloth worker reports a model it cannot load or wrap (UNSUPPORTED_JSON): the variant is skipped with
    Unsloth's reason; an interpreter that does not start is the variant's error; neither ends the bench."""
    fake = tmp_path / "fake-python"
    reason = "NotImplementedError: Unsloth: mixtral not supported yet!"
    fake.write_text(f"#!/bin/sh\necho loading\necho 'UNSUPPORTED_JSON {json.dumps({'reason': reason})}'\n")
    fake.chmod(0o755)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    cfg = BenchConfig(model="mixtral-8x7b", unsloth_python=str(fake))
    args = (model_dir, synthetic_tokenizer(64), [[3, 4, 5]], "cuda", architecture(cfg), None)
    result = run_unsloth("unsloth", cfg, *args)
    assert (result.skipped, result.error) == (f"Unsloth cannot run mixtral: {reason}", None)
    missing = run_unsloth("unsloth", replace(cfg, unsloth_python=str(tmp_path / "no-python")), *args)
    assert missing.error.startswith("FileNotFoundError") and missing.skipped is None


def test_markdown_shows_a_moe_models_weights_against_their_4_bit_size():
    variant = dict(
        name="project",
        error=None,
        skipped=None,
        tokens_per_s=1000.0,
        tokens_per_step=16000.0,
        step_time_s=16.0,
        peak_memory_gib=20.0,
        mfu=0.1,
        first_losses=[10.4],
        final_loss=None,
        weights_bytes=int(1.02 * 8 * 2**30),
        four_bit_size_bytes=8 * 2**30,
        weights_vs_four_bit=1.02,
    )
    report = {
        "model": "mixtral-8x7b",
        "data": "synthetic",
        "environment": {"device": "H200"},
        "timed_steps": 5,
        "warmup_steps": 2,
        "architecture": architecture(BenchConfig(model="mixtral-8x7b", num_layers=4)),
        "variants": [variant],
    }
    table = markdown_table(report)
    assert "weights GiB / 4-bit size GiB |" in table and "| 8.16 / 8 (1.02x) |" in table
    report["architecture"] = architecture(BenchConfig(model="qwen3-8b"))
    assert "4-bit size" not in markdown_table(report)


@pytest.mark.slow
def test_bench_smoke_cpu_on_a_mixture_of_experts(tmp_path):
    """`qlora-flow bench --model tiny-moe --device cpu`: TRL's settings and the project's path train the 4-bit
    mixture of experts (~20-45 s on two cores), and the report gives its 4-bit weight size."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "flows.cli", "bench", "--model", "tiny-moe", "--device", "cpu", "--steps", "1"]
    cmd += ["--variants", "trl_best,project", "--model-dir", str(tmp_path / "models"), "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["architecture"]["model_type"] == "qwen3_moe"
    for v in report["variants"]:
        assert v["error"] is None and v["tokens_per_s"] > 0, v
        assert 9 < v["first_losses"][0] < 12  # ~ln(32000)
        assert v["four_bit_size_bytes"] > 0 and v["weights_bytes"] is None  # memory_allocated on CUDA only
    assert "weights GiB / 4-bit size GiB" in (out / "bench.md").read_text()
