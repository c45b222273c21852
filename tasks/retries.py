"""Retry policy shared by the steps."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from qlora.errors import PipelineInputError


def retry_unless_input_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never a bad-input error (it would fail again)."""
    try:
        state.result()
    except PipelineInputError:
        return False
    except Exception:
        return True
    return True


# Steps that download or reach a server: a hung download fails after an hour and is retried; bad input never is.
# Their results (models, tokenizers) are never cached or persisted.
DOWNLOAD_STEP = dict(
    timeout_seconds=3600,
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_condition_fn=retry_unless_input_error,
)
