"""Training on the tiny model: the loss goes down, and every training row ends with EOS."""

from __future__ import annotations

import pytest

from pipeline_config.schema import load_pipeline_config
from tasks.data import load_dataset_splits
from tasks.evaluate import eval_loss, scored_examples
from tasks.model import load_quantized_model, wrap_lora
from tasks.tokenizer import setup_tokenizer
from tasks.train import train_adapter

pytestmark = pytest.mark.slow


def test_training_lowers_loss_and_rows_end_with_eos(tiny_config_file):
    # A random 2-layer model learns little in a few steps, so it is asked to fit 16 rows, scored on those rows.
    cfg = load_pipeline_config(
        tiny_config_file, ["training.max_steps=30", "training.learning_rate=2e-2", "data.max_train_rows=16"]
    )
    data = load_dataset_splits(cfg.data)
    data.eval = data.train
    tokenizer = setup_tokenizer(cfg.model, cfg.tokenizer, data.is_conversational)
    model = load_quantized_model(cfg.model, cfg.quantization, "cpu")
    model, lora_config = wrap_lora(model, cfg.lora, cfg.training)
    examples = scored_examples(data, tokenizer, max_rows=16, max_len=cfg.training.max_seq_length)
    before = eval_loss(model, tokenizer, examples, batch_size=8)

    result = train_adapter(model, data, lora_config, tokenizer, cfg.training, device="cpu")

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
