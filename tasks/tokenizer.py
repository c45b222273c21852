"""Step `setup-tokenizer` (qlora/tokenizer.py)."""

from __future__ import annotations

from prefect import task

from pipeline_config.schema import TokenizerConfig
from qlora.model_source import ModelSource
from qlora.tokenizer import setup_tokenizer
from tasks.retries import DOWNLOAD_STEP


@task(name="setup-tokenizer", **DOWNLOAD_STEP, retry_delay_seconds=[5, 30])
def setup_tokenizer_task(source: ModelSource, tok_cfg: TokenizerConfig, needs_chat_template: bool):
    """Retried because the hub download can fail transiently."""
    return setup_tokenizer(source, tok_cfg, needs_chat_template)
