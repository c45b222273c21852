"""Assistant-only loss: the training chat template of each family masks exactly the assistant turns.

Each family's ORIGINAL template (TRL's copy, or this project's for Mistral) goes on the SmolLM2 tokenizer with the
family's special tokens added (so they are single tokens); the training template comes from
`qlora.chat_template.training_chat_template`, and the rows are tokenized the way SFTTrainer tokenizes them
(`apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True, chat_template=...)`). No weights,
except the one test that builds the real trainer on the tiny 2-layer model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pytest
import trl
import yaml
from pydantic import ValidationError
from transformers import AutoTokenizer

from flows.cli import main
from pipeline_config.schema import LoraAdapterConfig, TrainingConfig
from qlora.chat_template import (
    TEMPLATES_DIR,
    decide_assistant_only_loss,
    find_training_template,
    training_chat_template,
)
from qlora.errors import PipelineInputError
from tests.conftest import tiny_config_dict

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# family: (original template, special tokens added, bos, eos, tokens that must never be in the loss, who ships the
# training version)
FAMILIES = {
    "llama3": (TRL_TEMPLATES / "llama3.jinja", LLAMA3_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "TRL"),
    "llama3_1": (TRL_TEMPLATES / "llama3_1.jinja", LLAMA3_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "project"),
    "llama3_2": (TRL_TEMPLATES / "llama3_2.jinja", LLAMA3_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "project"),
    "qwen3": (
        TRL_TEMPLATES / "qwen3.jinja",
        ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        None,
        "<|im_end|>",
        "TRL",
    ),
    "gemma3": (TRL_TEMPLATES / "gemma3.jinja", ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "TRL"),
    "mistral": (TEMPLATES_DIR / "mistral_v0_3.jinja", ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "project"),
    "phi3": (
        TRL_TEMPLATES / "phi3.jinja",
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        None,
        "<|endoftext|>",
        "TRL",
    ),
}
# Tokens that open or head a turn: never part of what the model is trained to write.
HEADER_TOKENS = {
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|im_start|>",
    "<bos>",
    "<start_of_turn>",
    "<s>",
    "[INST]",
    "[/INST]",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
}

SYSTEM = "You answer in one line."
USER_1, ANSWER_1 = "Order two mugs for Mei.", '{"name": "Mei", "item": "mug", "quantity": 2}'
USER_2, ANSWER_2 = "And one teapot?", '{"name": "Mei", "item": "teapot", "quantity": 1}'
REASONING = "One teapot, same customer."


def conversation(system: bool = True, thinking: bool = False) -> list[dict]:
    second = f"<think>\n{REASONING}\n</think>\n\n{ANSWER_2}" if thinking else ANSWER_2
    turns = [
        {"role": "user", "content": USER_1},
        {"role": "assistant", "content": ANSWER_1},
        {"role": "user", "content": USER_2},
        {"role": "assistant", "content": second},
    ]
    return ([{"role": "system", "content": SYSTEM}] if system else []) + turns


def family_tokenizer(smol_tokenizer_dir, family: str):
    """The SmolLM2 tokenizer with `family`'s special tokens, BOS / EOS and ORIGINAL chat template."""
    path, specials, bos, eos, _ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    return tokenizer


def masked_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each maximal run of masked (trained) tokens."""
    runs, current = [], []
    for token, masked in zip(ids, mask, strict=True):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in runs]


def thought(reasoning: str = "") -> str:
    return f"<think>\n{reasoning}\n</think>\n\n"


# (family, system message, thinking in the last turn, the masked text of each assistant turn)
CASES = [
    ("llama3", True, False, [ANSWER_1 + "<|eot_id|>", ANSWER_2 + "<|eot_id|>"]),
    ("llama3_1", True, False, [ANSWER_1 + "<|eot_id|>", ANSWER_2 + "<|eot_id|>"]),
    ("llama3_2", True, False, [ANSWER_1 + "<|eot_id|>", ANSWER_2 + "<|eot_id|>"]),
    # TRL's Qwen3 training template writes a <think> block in every assistant turn (empty without reasoning): the
    # original writes one only after the last user message. The mask follows what the training template renders.
    ("qwen3", True, False, [thought() + ANSWER_1 + "<|im_end|>\n", thought() + ANSWER_2 + "<|im_end|>\n"]),
    ("qwen3", True, True, [thought() + ANSWER_1 + "<|im_end|>\n", thought(REASONING) + ANSWER_2 + "<|im_end|>\n"]),
    ("gemma3", True, False, [ANSWER_1 + "<end_of_turn>\n", ANSWER_2 + "<end_of_turn>\n"]),
    # The generation prompt ends at [/INST]: the model writes the space, the answer and </s>.
    ("mistral", True, False, [" " + ANSWER_1 + "</s>", " " + ANSWER_2 + "</s>"]),
    ("mistral", False, False, [" " + ANSWER_1 + "</s>", " " + ANSWER_2 + "</s>"]),
    # Phi-3 closes the last assistant turn with EOS after <|end|>\n; the training template trains it too.
    ("phi3", True, False, [ANSWER_1 + "<|end|>\n", ANSWER_2 + "<|end|>\n<|endoftext|>"]),
]


@pytest.mark.parametrize(("family", "system", "thinking", "expected"), CASES)
def test_assistant_mask_is_exactly_the_assistant_turns(smol_tokenizer_dir, family, system, thinking, expected):
    tokenizer = family_tokenizer(smol_tokenizer_dir, family)
    messages = conversation(system, thinking)
    found = find_training_template(tokenizer)
    assert found is not None and found.template == training_chat_template(tokenizer)
    assert ("TRL's training version" in found.source) == (FAMILIES[family][4] == "TRL")

    out = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True, chat_template=found.template
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=found.template)
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == rendered  # every character is in a token
    assert masked_runs(tokenizer, ids, mask) == expected
    header_ids = {tokenizer.convert_tokens_to_ids(t) for t in HEADER_TOKENS if t in tokenizer.get_vocab()}
    assert not header_ids & {t for t, m in zip(ids, mask, strict=True) if m}
    for text in (SYSTEM, USER_1, USER_2):  # no user or system text is trained
        assert all(text not in run for run in masked_runs(tokenizer, ids, mask))

    original = tokenizer.apply_chat_template(messages, tokenize=False)
    if family == "qwen3":  # the earlier turn gains its (empty) <think> block; the rest is the same text
        assert rendered == original.replace(ANSWER_1, thought() + ANSWER_1, 1)
    else:
        assert rendered == original
    # What evaluation and generation render: the prompt of one turn is the same text under both templates.
    prompt = messages[: 2 if system else 1]
    assert tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, chat_template=found.template
    ) == tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def test_mistral_v0_3_drops_the_system_message_of_a_finished_conversation(smol_tokenizer_dir):
    """Mistral-7B-Instruct-v0.3's own template writes the system message into the LAST user turn only when that
    turn ends the conversation (`loop.last`): a training row that ends with the answer loses it. The training
    version keeps the original's text, this included; the prompt at inference has it."""
    tokenizer = family_tokenizer(smol_tokenizer_dir, "mistral")
    template = training_chat_template(tokenizer)
    row = conversation(system=True)
    assert SYSTEM not in tokenizer.apply_chat_template(row, tokenize=False, chat_template=template)
    prompt = tokenizer.apply_chat_template(row[:-1], tokenize=False, add_generation_prompt=True)
    assert f"[INST] {SYSTEM}\n\n{USER_2}[/INST]" in prompt


def test_llama3_1_tool_call_turn_is_trained_and_renders_as_the_original(smol_tokenizer_dir):
    tokenizer = family_tokenizer(smol_tokenizer_dir, "llama3_1")
    template = training_chat_template(tokenizer)
    call = {"type": "function", "function": {"name": "order", "arguments": {"item": "mug"}}}
    messages = [
        {"role": "user", "content": USER_1},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": ANSWER_1},
    ]
    out = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
    )
    expected_call = '{"name": "order", "parameters": {"item": "mug"}}<|eot_id|>'
    assert masked_runs(tokenizer, out["input_ids"], out["assistant_masks"]) == [
        expected_call,
        ANSWER_1 + "<|eot_id|>",
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template) == (
        tokenizer.apply_chat_template(messages, tokenize=False)
    )


def test_template_sources(smol_tokenizer_dir):
    tokenizer = family_tokenizer(smol_tokenizer_dir, "mistral")
    assert training_chat_template(tokenizer) == (TEMPLATES_DIR / "mistral_v0_3_training.jinja").read_text()
    # A template with its own markers is used as it is.
    marked = training_chat_template(tokenizer)
    tokenizer.chat_template = marked
    found = find_training_template(tokenizer)
    assert found.template == marked and "its own {% generation %} markers" in found.source
    # Recognised by exact equality, as TRL does: one character more and it is unknown.
    tokenizer.chat_template = (TEMPLATES_DIR / "mistral_v0_3.jinja").read_text() + " "
    assert training_chat_template(tokenizer) is None
    tokenizer.chat_template = None
    assert training_chat_template(tokenizer) is None


@pytest.fixture
def smol_tokenizer(smol_tokenizer_dir):
    """SmolLM2's own chat template: no markers, no training version known."""
    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_decision_for_data_that_is_not_chat(smol_tokenizer_dir, kind):
    tokenizer = family_tokenizer(smol_tokenizer_dir, "llama3")
    for requested in (None, False):
        decision = decide_assistant_only_loss(requested, kind, tokenizer)
        assert decision == (False, None, f"loss on every token: the data is {kind!r}, not chat")
    with pytest.raises(PipelineInputError, match="training.assistant_only_loss needs chat"):
        decide_assistant_only_loss(True, kind, tokenizer)


@pytest.mark.parametrize("requested", [None, True])
def test_decision_with_a_known_template_is_on(smol_tokenizer_dir, requested):
    tokenizer = family_tokenizer(smol_tokenizer_dir, "mistral")
    on, template, reason = decide_assistant_only_loss(requested, "messages", tokenizer)
    assert on and template == training_chat_template(tokenizer)
    assert reason.startswith("loss on the assistant tokens only: this project's training version of the Mistral")
    # unset with 'wrapped' packing: off (rows are cut mid-sequence); true with it is a config error (schema)
    assert decide_assistant_only_loss(None, "messages", tokenizer, wrapped_packing=True)[:2] == (False, None)


def test_decision_false_is_off(smol_tokenizer_dir, smol_tokenizer):
    for tokenizer in (family_tokenizer(smol_tokenizer_dir, "qwen3"), smol_tokenizer):
        assert decide_assistant_only_loss(False, "messages", tokenizer) == (
            False,
            None,
            "loss on the whole conversation: training.assistant_only_loss is false",
        )


def test_decision_with_an_unknown_template(smol_tokenizer):
    on, template, reason = decide_assistant_only_loss(None, "messages", smol_tokenizer)
    assert (on, template) == (False, None)
    assert reason == (
        f"loss on the whole conversation: the chat template of {smol_tokenizer.name_or_path} has no "
        "{% generation %} markers and no training version is known for it"
    )
    with pytest.raises(PipelineInputError) as caught:
        decide_assistant_only_loss(True, "messages", smol_tokenizer)
    assert str(caught.value) == (
        f"training.assistant_only_loss: the chat template of {smol_tokenizer.name_or_path} has no {{% generation %}} "
        "markers and no training version is known for it: set tokenizer.chat_template_file to a template with "
        "markers, or set training.assistant_only_loss: false"
    )


def test_config_refuses_assistant_only_loss_with_wrapped_packing():
    with pytest.raises(ValidationError, match="assistant_only_loss cannot be kept"):
        TrainingConfig(packing=True, packing_strategy="wrapped", assistant_only_loss=True)
    with pytest.raises(ValidationError, match="choose one"):
        TrainingConfig(completion_only_loss=True, assistant_only_loss=True)
    assert TrainingConfig(packing=True, packing_strategy="wrapped").assistant_only_loss is None
    assert TrainingConfig(packing=False, packing_strategy="wrapped", assistant_only_loss=True).assistant_only_loss


def _validate(tiny_llama_dir, tmp_path, capsys, **training) -> tuple[int, str, str]:
    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    raw["training"].update(training)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["validate", "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_exits_2_when_assistant_only_loss_has_no_template(tiny_llama_dir, tmp_path, capsys):
    """The tiny model has SmolLM2's chat template: no markers and no training version, found before weights."""
    code, out, err = _validate(tiny_llama_dir, tmp_path, capsys, assistant_only_loss=True)
    assert code == 2
    assert "training.assistant_only_loss: the chat template of" in err and "Traceback" not in err
    assert "set training.assistant_only_loss: false" in err

    code, out, err = _validate(tiny_llama_dir, tmp_path, capsys)  # unset: off, and the report says why
    assert code == 0
    assert "loss on the whole conversation: the chat template of" in out


def test_training_tokenizes_with_the_training_template_and_restores_the_original(
    tiny_llama_dir, smol_tokenizer_dir, caplog
):
    """The real SFTTrainer, built by train_adapter on the tiny model (one step): the rows it trained on have labels
    on the assistant tokens only (Mistral's template, which TRL alone would refuse), and the tokenizer has its
    original template back afterwards."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.data import DatasetSplits
    from qlora.train import train_adapter

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)  # no tokens added: the model's vocabulary
    original = (TEMPLATES_DIR / "mistral_v0_3.jinja").read_text()
    tokenizer.chat_template = original
    tokenizer.pad_token = "<|endoftext|>"
    rows = datasets.Dataset.from_list([{"messages": conversation(system=False)}] * 2)
    data = DatasetSplits(train=rows, eval=rows, kind="messages", digest="test", source="test")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    cfg = TrainingConfig(
        output_dir=str(tiny_llama_dir.parent / "unused-out"),
        max_steps=1,
        packing=False,
        save_steps=0,
        per_device_train_batch_size=2,
        logging_steps=1,
        device="cpu",
    )
    with caplog.at_level(logging.INFO, logger="qlora.train"):
        result = train_adapter(model, data, tokenizer, LoraAdapterConfig(r=4, alpha=8), cfg, "cpu")

    assert tokenizer.chat_template == original
    assert any(
        r.getMessage().startswith("loss on the assistant tokens only: this project's training version of the Mistral")
        for r in caplog.records
    )
    row = result.train_dataset[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    eos = tokenizer.eos_token
    assert tokenizer.decode(trained, clean_up_tokenization_spaces=False) == f" {ANSWER_1}{eos} {ANSWER_2}{eos}"
