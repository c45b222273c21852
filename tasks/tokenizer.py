"""Step `setup-tokenizer` (qlora/tokenizer.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import TokenizerConfig
from qlora.model_source import ModelSource
from qlora.tokenizer import setup_tokenizer
from tasks.retries import retry_unless_input_error


@task(
    name="setup-tokenizer",
    timeout_seconds=3600,  # a hung hub download fails and is retried instead of blocking the run
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_input_error,
)
def setup_tokenizer_task(source: ModelSource, tok_cfg: TokenizerConfig, needs_chat_template: bool):
    """Retried because the hub download can fail transiently."""
    return setup_tokenizer(source, tok_cfg, needs_chat_template)
