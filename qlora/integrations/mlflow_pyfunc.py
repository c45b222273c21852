"""MLflow pyfunc: a served model that checks its own input.

Written for MLflow 3.17. `predict`'s type hints give the logged model a signature, and MLflow then wraps `predict` to
validate inputs against them (at class creation, in `PythonModel.__init_subclass__`): that check refuses a bare
string (not a list) and reads a DataFrame's first column whatever its name. The private class attribute
`_skip_type_hint_validation` (what MLflow's own ChatModel sets) leaves `predict` unwrapped, so `normalize_prompts`
(qlora/serving.py) checks instead and a bad input gets a 400 with a message. It must be set before the subclass is
created, hence a base class. tests/test_integrations.py checks that MLflow still reads the flag.
"""

from __future__ import annotations

import mlflow

WRITTEN_FOR = {"mlflow": "3.17.2"}
SKIP_FLAG = "_skip_type_hint_validation"


class SelfCheckingPythonModel(mlflow.pyfunc.PythonModel):
    """A PythonModel whose signature comes from `predict`'s type hints but whose `predict` checks its own input."""

    _skip_type_hint_validation = True
