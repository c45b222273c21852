"""Retry policies shared by the steps: a retry only where it can help."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from qlora.errors import PipelineInputError, RunEnvironmentError, is_transient


def _failure(state) -> BaseException | None:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 (the failed state's exception, whatever it is)
        return exc
    return None


# Failures of a step that reads or downloads which say something about the code or the model itself (an attention
# the family lacks, a config transformers cannot build): a retry a minute later meets the same.
DETERMINISTIC = (PipelineInputError, RunEnvironmentError, ValueError, TypeError, AttributeError, KeyError, ImportError)


def retry_unless_input_error(task, task_run, state) -> bool:
    """Retry a download's failures, which come in too many forms to list, but not bad input, a full disk or an error
    that says something about the code or the model (they would fail again)."""
    failure = _failure(state)
    if failure is None:
        return False
    return is_transient(failure) or not isinstance(failure, DETERMINISTIC + (NotImplementedError,))


def retry_if_transient(task, task_run, state) -> bool:
    """Retry only what a retry can fix (qlora.errors.is_transient): a lost training process, a service outage. An
    error in the code or the data fails at once, with its message, instead of failing again a minute later."""
    failure = _failure(state)
    return failure is not None and is_transient(failure)


# Steps that download or reach a server: a hung download fails after an hour and is retried; bad input never is.
# Their results (models, tokenizers) are never cached or persisted.
DOWNLOAD_STEP = dict(
    timeout_seconds=3600,
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_condition_fn=retry_unless_input_error,
)
