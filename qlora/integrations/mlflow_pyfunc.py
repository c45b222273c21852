"""MLflow pyfunc: the served model checks its own input.

Written for MLflow 3.17. `predict`'s type hints give the logged model a signature, and MLflow then validates inputs
against them before `predict` runs: that check refuses a bare string (not a list) and reads a DataFrame's first
column whatever its name. The private class attribute `_skip_type_hint_validation` (what MLflow's own ChatModel
sets) switches the check off, so `normalize_prompts` (qlora/serving.py) checks instead and a bad input gets a 400
with a message. tests/test_integrations.py checks that MLflow still reads the flag.
"""

from __future__ import annotations

WRITTEN_FOR = {"mlflow": "3.17.2"}
SKIP_FLAG = "_skip_type_hint_validation"


def check_input_in_predict(cls: type) -> type:
    """Class decorator: MLflow keeps the signature from the type hints but leaves input checking to `predict`."""
    setattr(cls, SKIP_FLAG, True)
    return cls
