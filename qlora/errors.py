"""Errors that mean "fix your input", reported in one line with exit code 2 by the CLI."""


class PipelineInputError(ValueError):
    """Bad input (data, model location, environment) found before or while loading; the message says what to do."""


class DataError(PipelineInputError):
    """The dataset cannot be read or does not have the expected shape."""


class ModelSourceError(PipelineInputError):
    """The base model cannot be found or fetched."""
