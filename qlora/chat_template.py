"""Which chat template a run trains with, and whether the loss can be on the assistant turns only.

TRL's SFTTrainer computes the loss on the assistant tokens only (`SFTConfig.assistant_only_loss`) from the
`{% generation %}` / `{% endgeneration %}` markers of the chat template. Few models ship them; TRL keeps training
versions (same text, with markers) of the templates it recognises by exact string equality
(`trl.chat_template_utils.get_training_chat_template`: Llama 3, Qwen 2.5 / 3, Gemma, Gemma 3, Phi-3 ...).
This project adds its own, in `qlora/chat_templates/`, for templates TRL has none for (`PROJECT_TRAINING_TEMPLATES`),
recognised the same way:

- Mistral-7B-Instruct-v0.3 (`mistral_v0_3.jinja`, the original as the hub ships it; `mistral_v0_3_training.jinja`);
- Llama 3.1 and 3.2 (the originals are TRL's `llama3_1.jinja` / `llama3_2.jinja`; TRL maps only Llama 3's).

The training template is used for tokenizing the training rows only (`training_template_applied`); evaluation and
generation keep the tokenizer's own template. The training versions render the same text as the originals, except
TRL's Qwen3 one, which writes the `<think>` block of every assistant turn where the original keeps only the last
turn's (TRL's choice, for prefix preservation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from trl import chat_template_utils
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from qlora.errors import PipelineInputError

TEMPLATES_DIR = Path(__file__).resolve().parent / "chat_templates"


def _read(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text(encoding="utf-8")


# (name, original template text, training template file in TEMPLATES_DIR): the originals are compared by exact
# string equality, as TRL compares them.
PROJECT_TRAINING_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("Mistral-7B-Instruct-v0.3", _read("mistral_v0_3.jinja"), "mistral_v0_3_training.jinja"),
    ("Llama 3.1", chat_template_utils.llama3_1_chat_template, "llama3_1_training.jinja"),
    ("Llama 3.2", chat_template_utils.llama3_2_chat_template, "llama3_2_training.jinja"),
)


class TrainingTemplate(NamedTuple):
    """A chat template with generation markers, and where it came from (for the run log)."""

    template: str
    source: str


class AssistantLossDecision(NamedTuple):
    """`training.assistant_only_loss` resolved for a run: on or off, the template to train with (when on), why."""

    assistant_only_loss: bool
    template: str | None
    reason: str


def _own_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # a template shipped as named variants: its default one is the chat template
        template = template.get("default")
    return template or None


def _model_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the model"


def find_training_template(tokenizer: PreTrainedTokenizerBase) -> TrainingTemplate | None:
    """The tokenizer's chat template with `{% generation %}` markers, and its source: the tokenizer's own when it has
    markers, else TRL's training version of it, else this project's (`PROJECT_TRAINING_TEMPLATES`); None when
    there is none (or the tokenizer has no chat template)."""
    own = _own_template(tokenizer)
    if own is None:
        return None
    name = _model_name(tokenizer)
    if has_generation_markers(own):
        return TrainingTemplate(own, f"the chat template of {name} has its own {{% generation %}} markers")
    try:
        trl_template = get_training_chat_template(tokenizer)
    except (ValueError, TypeError, TemplateError):  # TRL does not know this template (or its probes fail on it)
        trl_template = None
    if trl_template is not None:
        return TrainingTemplate(trl_template, f"TRL's training version of the chat template of {name}")
    for family, original, file_name in PROJECT_TRAINING_TEMPLATES:
        if own == original:
            return TrainingTemplate(
                _read(file_name),
                f"this project's training version of the {family} chat template of {name} "
                f"(qlora/chat_templates/{file_name})",
            )
    return None


def training_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template to train with, with `{% generation %}` markers around the assistant turns, or None when
    none is known for the tokenizer's template (see `find_training_template`)."""
    found = find_training_template(tokenizer)
    return found.template if found else None


def decide_assistant_only_loss(
    requested: bool | None,
    data_kind: str,
    tokenizer: PreTrainedTokenizerBase,
    wrapped_packing: bool = False,
) -> AssistantLossDecision:
    """Resolve `training.assistant_only_loss` for data of `data_kind` ('messages' is chat) and the tokenizer's
    chat template. Unset: on for chat data when a template with generation markers is known (and rows are not cut
    by 'wrapped' packing), off otherwise. Raises PipelineInputError when it is true but the data is not chat, or
    no template with markers is known."""
    if data_kind != "messages":
        if requested:
            raise PipelineInputError(
                f"training.assistant_only_loss needs chat (messages) data, but the data is {data_kind!r}: set "
                "training.assistant_only_loss: false (prompt/completion data has training.completion_only_loss)"
            )
        return AssistantLossDecision(False, None, f"loss on every token: the data is {data_kind!r}, not chat")
    if requested is False:
        return AssistantLossDecision(
            False, None, "loss on the whole conversation: training.assistant_only_loss is false"
        )
    found = find_training_template(tokenizer)
    if found is None:
        if requested:
            raise PipelineInputError(
                f"training.assistant_only_loss: the chat template of {_model_name(tokenizer)} has no "
                "{% generation %} markers and no training version is known for it: set tokenizer.chat_template_file "
                "to a template with markers, or set training.assistant_only_loss: false"
            )
        return AssistantLossDecision(
            False,
            None,
            f"loss on the whole conversation: the chat template of {_model_name(tokenizer)} has no "
            "{% generation %} markers and no training version is known for it",
        )
    if requested is None and wrapped_packing:
        return AssistantLossDecision(
            False, None, "loss on the whole conversation: packing_strategy 'wrapped' cuts rows mid-sequence"
        )
    return AssistantLossDecision(True, found.template, f"loss on the assistant tokens only: {found.source}")


@contextlib.contextmanager
def training_template_applied(tokenizer: PreTrainedTokenizerBase, template: str | None) -> Iterator[None]:
    """`template` as the tokenizer's chat template inside the block (SFTTrainer tokenizes the training rows when it
    is built, and then finds the markers in the tokenizer's own template); the tokenizer's template is back
    afterwards, for evaluation, generation and saving. None: nothing changes."""
    if template is None:
        yield
        return
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield
    finally:
        tokenizer.chat_template = original
