"""Tokenizer set-up, 4-bit loading of a tiny Llama on the real bitsandbytes path, and LoRA wrapping."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model

from pipeline_config.schema import (
    LoraAdapterConfig,
    ModelConfig,
    QuantizationConfig,
    TokenizerConfig,
)
from qlora.errors import ModelSourceError, PipelineInputError
from qlora.model import build_lora_config, load_quantized_model
from qlora.model_source import check_model_source, resolve_model_source
from qlora.tokenizer import setup_tokenizer


def _source(folder):
    return resolve_model_source(ModelConfig(name_or_path=str(folder)))


def test_tokenizer_pad_is_not_eos_and_pads_right(tiny_llama_dir):
    tok = setup_tokenizer(_source(tiny_llama_dir), TokenizerConfig(), needs_chat_template=True)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    batch = tok(["a", "a b c d"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_missing_chat_template_for_chat_data_is_an_input_error(tiny_llama_dir, tmp_path):
    import shutil

    copy = tmp_path / "no-template"
    shutil.copytree(tiny_llama_dir, copy)
    (copy / "chat_template.jinja").unlink()
    with pytest.raises(PipelineInputError, match="no chat template"):
        setup_tokenizer(_source(copy), TokenizerConfig(), needs_chat_template=True)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = setup_tokenizer(_source(copy), TokenizerConfig(chat_template_file=str(template)), True)
    assert tok.chat_template == template.read_text()
    # a model that has a template of its own gets the file's instead (a version with generation markers)
    tok = setup_tokenizer(_source(tiny_llama_dir), TokenizerConfig(chat_template_file=str(template)), True)
    assert tok.chat_template == template.read_text()


def test_missing_model_folder_is_reported(tmp_path):
    with pytest.raises(ModelSourceError, match="folder not found"):
        check_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear_layers_load_in_4bit(tiny_llama_dir, quant_type):
    model = load_quantized_model(
        _source(tiny_llama_dir),
        QuantizationConfig(quant_type=quant_type, compute_dtype="float32", double_quant=True),
        device="cpu",
    )
    linears = [m for n, m in model.named_modules() if "layers." in n and isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for layer in linears:
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert layer.weight.quant_state.quant_type == quant_type
        assert layer.weight.dtype == torch.uint8  # packed 4-bit storage
        assert layer.compute_dtype == torch.float32
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_lora_trainable_count(tiny_llama_dir):
    model = load_quantized_model(_source(tiny_llama_dir), QuantizationConfig(compute_dtype="float32"), device="cpu")
    lora_config = build_lora_config(LoraAdapterConfig(r=8, target_modules="all-linear"))
    peft_model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    h, i, kv = 64, 128, 2 * 16  # hidden, intermediate, kv heads x head dim
    per_layer = sum(8 * (a + b) for a, b in [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)])
    assert trainable == 2 * per_layer
    assert lora_config.r == 8 and lora_config.lora_alpha == 32
