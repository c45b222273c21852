"""MLflow: the rules MLflow applies to a registered model's name and to a tracking URI's scheme, asked of MLflow
itself so that `validate` refuses exactly what registration or the first tracking call would refuse after training.

Written for MLflow 3.17. Private names used (tests/test_integrations.py checks them):
`mlflow.utils.validation._validate_model_name` and the tracking-store registry
`mlflow.tracking._tracking_service.utils._tracking_store_registry` (its `get_store_builder` and `_registry`).
"""

from __future__ import annotations

WRITTEN_FOR = {"mlflow": "3.17.2"}


def registered_model_name_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` as a registered model's name, or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        return exc.message.splitlines()[0]
    return None


def tracking_schemes() -> list[str]:
    """The URI schemes MLflow has a tracking store for ('' is a plain path)."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    return sorted(s for s in _tracking_store_registry._registry if s)


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow has no tracking store for `uri`'s scheme, or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        return f"MLflow has no tracking store for this scheme; it takes {', '.join(tracking_schemes())} or a path"
    return None
