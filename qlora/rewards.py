"""Reward functions of a GRPO stage: the built-in verifiable rewards for structured output, and user rewards loaded
from a Python entry point.

Every reward has TRL's reward-function signature: `reward(prompts, completions, **columns) -> list[float]`, one
value per completion, where `columns` holds the dataset's other columns (as lists, one value per completion: the
expected `answer` among them), plus `completion_ids` and `trainer_state` from TRL. A completion is text, or (chat
data) a list holding its assistant turn. The function's `__name__` names its metrics in MLflow
(`rewards/<name>/mean`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_config.stages import BUILT_IN_REWARDS, RewardConfig
from qlora.errors import PipelineInputError

RewardFunction = Callable[..., list[float]]


def completion_text(completion) -> str:
    """The text of a completion: itself, or the content of its (last) assistant turn."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def parsed_json(text: str) -> tuple[bool, Any]:
    """(True, value) when the whole text (surrounding whitespace aside) is one JSON value; else (False, None). Text
    around the JSON is a mistake the reward must see, so nothing is cut out of it."""
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, TypeError):
        return False, None


def _expected(answer) -> Any:
    """An expected answer given as JSON text or as the value itself."""
    if isinstance(answer, str):
        ok, value = parsed_json(answer)
        return value if ok else answer
    return answer


def valid_json(prompts, completions, **_) -> list[float]:
    """1.0 for a completion that is one JSON value and nothing else, else 0.0."""
    return [float(parsed_json(completion_text(c))[0]) for c in completions]


def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion equals the expected answer (surrounding whitespace aside), else 0.0."""
    return [
        float(completion_text(c).strip() == (a if isinstance(a, str) else json.dumps(a)).strip())
        for c, a in zip(completions, answer, strict=True)
    ]


def field_match_reward(fields: list[str] | None = None) -> RewardFunction:
    """The share of the expected answer's fields (or of `fields`) that the completion's JSON object has with the same
    value: 0.0 for a completion that is not a JSON object."""

    def field_match(prompts, completions, answer, **_) -> list[float]:
        scores = []
        for completion, expected in zip(completions, answer, strict=True):
            expected = _expected(expected)
            ok, value = parsed_json(completion_text(completion))
            names = fields or (list(expected) if isinstance(expected, dict) else [])
            if not ok or not isinstance(value, dict) or not names or not isinstance(expected, dict):
                scores.append(0.0)
                continue
            scores.append(sum(name in value and value[name] == expected.get(name) for name in names) / len(names))
        return scores

    return field_match


def json_schema_reward(schema: dict) -> RewardFunction:
    """1.0 for a completion that is JSON matching `schema` (JSON Schema), else 0.0."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)

    def json_schema(prompts, completions, **_) -> list[float]:
        scores = []
        for completion in completions:
            ok, value = parsed_json(completion_text(completion))
            scores.append(float(ok and validator.is_valid(value)))
        return scores

    return json_schema


def _import_entry_point(entry_point: str, field: str) -> Callable:
    module_name, _, name = entry_point.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a reward module in the working folder, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (any import failure is the user's module: say which and why)
        raise PipelineInputError(
            f"{field}: cannot import module {module_name!r} of reward {entry_point!r} "
            f"({type(exc).__name__}: {exc}): check the module path (relative to the working folder)"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise PipelineInputError(f"{field}: {module_name!r} has no function {name!r} (reward {entry_point!r})")
    return function


def signature_problem(function: Callable) -> str | None:
    """Why TRL could not call `function` as a reward: it must take `prompts` and `completions` by keyword and any
    other keyword (TRL passes every dataset column, `completion_ids` and `trainer_state`)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return "its signature cannot be read"
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [n for n in ("prompts", "completions") if n not in names]
    if missing:
        return f"it has no parameter {' or '.join(missing)}"
    if not any(p.kind == p.VAR_KEYWORD for p in parameters):
        return "it takes no **kwargs (TRL passes every dataset column, completion_ids and trainer_state by keyword)"
    required = [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ("prompts", "completions")
    ]
    if required:
        return f"it requires {', '.join(required)}, which must then be dataset columns: give them defaults otherwise"
    return None


def build_reward(spec: RewardConfig, field: str = "grpo.rewards") -> RewardFunction:
    """The reward function `spec` names. Raises PipelineInputError, naming the config `field`, for an entry point that
    cannot be imported or called as a reward."""
    if spec.function == "valid_json":
        return valid_json
    if spec.function == "exact_match":
        return exact_match
    if spec.function == "field_match":
        return field_match_reward(spec.fields)
    if spec.function == "json_schema":
        return json_schema_reward(spec.json_schema)
    assert spec.function not in BUILT_IN_REWARDS
    function = _import_entry_point(spec.function, field)
    if problem := signature_problem(function):
        raise PipelineInputError(
            f"{field}: {spec.function} cannot be a reward: {problem}. Write it as "
            "def reward(prompts, completions, **kwargs) -> list[float]"
        )
    return function


def reward_problems(specs: list[RewardConfig], columns: list[str], field: str = "grpo.rewards") -> list[str]:
    """Rewards that cannot be built, or read a column the data lacks (`answer` for exact_match / field_match)."""
    problems = []
    for spec in specs:
        try:
            build_reward(spec, field)
        except PipelineInputError as exc:
            problems.append(str(exc))
            continue
        if spec.function in ("exact_match", "field_match") and "answer" not in columns:
            problems.append(
                f"{field}: {spec.function} compares with the expected answer, but the data has no answer column "
                "(data.columns.answer)"
            )
    return problems
