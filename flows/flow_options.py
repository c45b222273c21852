"""A flow's parameters as command-line options: the flow's signature and docstring are the one description of what
a run takes (Prefect reads the same into the deployment's parameter form), and `qlora-flow` builds its options from
them: names, types, choices, defaults and help.

    add_flow_options(parser, flow_parameter_schema("flows.finetune:finetune"), flags={"config_path": "--config"})
    finetune(**flow_arguments(args))

The signature is read from the flow's source, not by importing it: a flow module imports the whole pipeline (torch,
transformers: seconds), and `qlora-flow run` must find a service that is down, or print its --help, before that.
Prefect's own `generate_parameter_schema` turns it into the schema `flow.parameters` gives (a test compares them).
A flag is `--<parameter-name>` unless `flags` names it otherwise; parameters whose type is an object (a validated
config, a sweep's trial) are for callers in Python and get no option.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FLOW_PARAMETERS = "flow_parameters"  # the argparse namespace attribute holding the names of the flow's options


@dataclass(frozen=True)
class Switch:
    """A flag without a value that sets its parameter to `value` (e.g. --no-resume sets resume='never')."""

    flag: str
    value: Any


def flow_parameter_schema(target: str) -> dict[str, Any]:
    """Prefect's parameter schema (as a dict) of the flow `target` ('package.module:function'), from its source. The
    parameters whose annotation names a class (a config object) are left out: they have no command-line form."""
    from prefect.utilities.callables import generate_parameter_schema, parameter_docstrings

    module, name = target.split(":")
    source = Path(importlib.util.find_spec(module).origin).read_text()
    func = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name)
    defaults = [None] * (len(func.args.args) - len(func.args.defaults)) + list(func.args.defaults)
    parameters = []
    for arg, default in zip(func.args.args, defaults, strict=True):
        try:
            annotation = eval(ast.unparse(arg.annotation), {"Literal": Literal})  # builtins and Literal only
        except NameError:
            continue
        value = inspect.Parameter.empty if default is None else ast.literal_eval(default)
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        parameters.append(inspect.Parameter(arg.arg, kind, default=value, annotation=annotation))
    docstrings = parameter_docstrings(ast.get_docstring(func))
    return generate_parameter_schema(inspect.Signature(parameters), docstrings).model_dump()


def _option_type(prop: dict[str, Any]) -> dict[str, Any]:
    """argparse keywords for one property of Prefect's parameter schema (JSON schema); {} for an object."""
    choices = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
    if len(choices) != 1 or "$ref" in choices[0]:
        return {}
    spec = choices[0]
    if "enum" in spec:
        return {"choices": spec["enum"]}
    kind = spec.get("type")
    if kind == "array":
        return {"action": "append", "metavar": "VALUE"}
    if kind == "boolean":
        return {"action": argparse.BooleanOptionalAction}
    return {"type": {"integer": int, "number": float, "string": str}[kind]}


def _help(prop: dict[str, Any]) -> str:
    text = " ".join(prop.get("description", "").split()).replace("%", "%%")
    default = prop.get("default")
    return f"{text} (default: {default})" if default not in (None, [], "") else text


def add_flow_options(
    parser: argparse.ArgumentParser,
    schema: dict[str, Any],
    flags: dict[str, str | Switch] | None = None,
    only: tuple[str, ...] | None = None,
    metavars: dict[str, str] | None = None,
) -> None:
    """Options on `parser` for the parameters in a flow's `schema` (those in `only`, if given)."""
    flags, metavars = flags or {}, metavars or {}
    names = []
    for name, prop in sorted(schema["properties"].items(), key=lambda item: item[1]["position"]):
        kwargs = _option_type(prop)
        if not kwargs or (only is not None and name not in only):
            continue
        flag = flags.get(name, "--" + name.replace("_", "-"))
        default = prop.get("default")
        if isinstance(flag, Switch):
            kwargs = {"action": "store_const", "const": flag.value}
            flag = flag.flag
        elif kwargs.get("action") == "append":
            kwargs["metavar"] = metavars.get(name, "VALUE")
            default = None  # argparse appends to a given default list; the flow's default applies when it stays None
        elif name in metavars:
            kwargs["metavar"] = metavars[name]
        required = name in schema.get("required", [])
        parser.add_argument(flag, dest=name, default=default, required=required, help=_help(prop), **kwargs)
        names.append(name)
    parser.set_defaults(**{FLOW_PARAMETERS: tuple(names)})


def flow_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's keyword arguments from a parsed command line: the options that `add_flow_options` added, except
    those left unset (the flow's own default applies)."""
    return {name: getattr(args, name) for name in getattr(args, FLOW_PARAMETERS) if getattr(args, name) is not None}
