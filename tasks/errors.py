"""Errors that mean "fix your input", reported in one line with exit code 2 by the CLI."""


class PipelineInputError(ValueError):
    """Bad input (data, model location, environment) found before or while loading; the message says what to do."""


class DataError(PipelineInputError):
    """The dataset cannot be read or does not have the expected shape."""


class ModelSourceError(PipelineInputError):
    """The base model cannot be found or fetched."""


def retry_unless_input_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never a bad-input error (it would fail again)."""
    try:
        state.result()
    except PipelineInputError:
        return False
    except Exception:
        return True
    return True
