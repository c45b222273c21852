"""Set up the tokenizer.

- pad token distinct from EOS where the vocabulary allows it, so that padding can never be confused with the
  end of an answer; EOS stays a trained token;
- right padding for training (generation switches to left padding on a copy);
- a chat template present when the data is conversational (`tokenizer.chat_template_file` replaces the model's).
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline_config.schema import TokenizerConfig
from qlora.errors import PipelineInputError
from qlora.model_source import ModelSource, hub_token

logger = logging.getLogger(__name__)

# Existing special tokens that models reserve for padding or that never appear inside an answer.
PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<unk>", "<|endoftext|>")


def choose_pad_token(tokenizer: PreTrainedTokenizerBase, requested: str | None) -> str:
    eos = tokenizer.eos_token
    if requested:
        if (
            tokenizer.convert_tokens_to_ids(requested) in (None, tokenizer.unk_token_id)
            and requested != tokenizer.unk_token
        ):
            raise PipelineInputError(f"tokenizer.pad_token {requested!r} is not in the vocabulary")
        return requested
    if tokenizer.pad_token and tokenizer.pad_token != eos:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for cand in (tokenizer.unk_token, *PAD_CANDIDATES):
        if cand and cand != eos and cand in vocab:
            return cand
    logger.warning("no special token other than EOS can pad; padding with EOS (masked out of the loss by position)")
    return eos


def setup_tokenizer(
    source: ModelSource, tok_cfg: TokenizerConfig, needs_chat_template: bool
) -> PreTrainedTokenizerBase:
    """Load the base model's tokenizer and make it ready for training. Raises PipelineInputError."""
    model_cfg = source.model
    tokenizer = AutoTokenizer.from_pretrained(
        source.path,
        gguf_file=source.gguf_file,
        revision=model_cfg.revision,
        token=hub_token(model_cfg),
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if tokenizer.eos_token is None:
        raise PipelineInputError(f"the tokenizer of {model_cfg.name_or_path} has no EOS token; set one in the model")
    tokenizer.pad_token = choose_pad_token(tokenizer, tok_cfg.pad_token)
    tokenizer.padding_side = "right"
    if tok_cfg.chat_template_file:
        template = Path(tok_cfg.chat_template_file)
        if not template.is_file():
            raise PipelineInputError(
                f"tokenizer.chat_template_file {template}: no such file (paths are relative to the working folder)"
            )
        tokenizer.chat_template = template.read_text(encoding="utf-8")  # replaces the model's own, if any
    if needs_chat_template and not tokenizer.chat_template:
        raise PipelineInputError(
            f"the data is chat (messages) but the tokenizer of {model_cfg.name_or_path} has no chat template: "
            "set tokenizer.chat_template_file to a Jinja template"
        )
    return tokenizer
