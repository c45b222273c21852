"""Retry policy shared by the steps."""

from __future__ import annotations

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
