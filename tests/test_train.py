"""Training on the tiny model: the loss goes down, and every training row ends with EOS."""

from __future__ import annotations

import pytest
import torch

from pipeline_config.schema import load_pipeline_config
from qlora.data import load_dataset_splits
from qlora.evaluate import eval_loss, scored_examples
from qlora.model import load_quantized_model
from qlora.model_source import resolve_model_source
from qlora.tokenizer import setup_tokenizer
from qlora.train import train_adapter

pytestmark = pytest.mark.slow


def test_training_lowers_loss_and_rows_end_with_eos(tiny_config_file):
    # A random 2-layer model learns little in a few steps, so it is asked to fit 16 rows, scored on those rows.
    cfg = load_pipeline_config(
        tiny_config_file, ["training.max_steps=30", "training.learning_rate=2e-2", "data.max_train_rows=16"]
    )
    data = load_dataset_splits(cfg.data)
    data.eval = data.train
    source = resolve_model_source(cfg.model)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, data.is_conversational)
    model = load_quantized_model(source, cfg.quantization, "cpu")
    examples = scored_examples(data, tokenizer, max_rows=16, max_len=cfg.training.max_seq_length)
    before = eval_loss(model, tokenizer, examples, batch_size=8)

    result = train_adapter(model, data, tokenizer, cfg.lora, cfg.training, device="cpu")

    after = eval_loss(result.model, tokenizer, examples, batch_size=8)
    assert after < before - 2.0, (before, after)  # measured: 12.6 -> 9.1 nats per answer token
    losses = [loss for _, loss in result.loss_history]
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert result.metrics["train_tokens"] > 0 and result.metrics["train_tokens_per_s"] > 0
    # Every tokenized training row closes its answer with EOS (the chat template adds only a newline after it).
    eos = tokenizer.eos_token_id
    for ids in result.train_dataset["input_ids"]:
        tail = [t for t in ids if t != tokenizer.convert_tokens_to_ids("\u010a")][-1:]
        assert tail == [eos]


def test_fsdp_arguments_are_fsdp1_with_one_unit_per_decoder_layer_and_its_own_checkpointing():
    """The FSDP-QLoRA settings as accelerate receives them. FSDP1 is deprecated in transformers 5.24 (FSDP2 keeps
    4-bit weights out of sharding in places, see qlora/train.py): this breaks when an upgrade drops or changes it."""
    from pipeline_config.schema import TrainingConfig
    from qlora.train import build_sft_config

    cfg = TrainingConfig(gradient_checkpointing=True, optim="adamw_torch", device="cpu")
    args = build_sft_config(cfg, "cuda", "/tmp/unused", fsdp=True)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 1 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["reshard_after_forward"] == "full_shard" and plugin["use_orig_params"] is False
    assert plugin["activation_checkpointing"] is True and not args.gradient_checkpointing  # FSDP's, not the Trainer's
    assert plugin["cpu_ram_efficient_loading"] is True and plugin["sync_module_states"] is True
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert not build_sft_config(cfg, "cuda", "/tmp/unused").fsdp  # DDP / one process: no FSDP


def test_an_adapter_saved_from_gathered_weights_equals_the_ordinary_save(tiny_llama_dir, tmp_path):
    """FSDP saves the LoRA weights gathered from the shards through a meta-device PEFT model of the same
    architecture (save_trained_adapter): the folder must hold exactly what the live model's own save writes."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora.model import build_lora_config
    from qlora.train import TrainResult, save_trained_adapter

    cfg = load_pipeline_config({"model": {"name_or_path": str(tiny_llama_dir)}, "data": {"source": "bundled:orders"}})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), build_lora_config(cfg.lora))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make every tensor distinct
            param.data.normal_()
    gathered = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    save_trained_adapter(TrainResult(model=model, metrics={}), tmp_path / "ordinary")
    save_trained_adapter(TrainResult(model=model, metrics={}, adapter_state_dict=gathered), tmp_path / "gathered")
    ordinary = load_file(str(tmp_path / "ordinary" / "adapter_model.safetensors"))
    from_gathered = load_file(str(tmp_path / "gathered" / "adapter_model.safetensors"))
    assert ordinary.keys() == from_gathered.keys() and len(ordinary) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for key in ordinary:
        assert torch.equal(ordinary[key], from_gathered[key])
