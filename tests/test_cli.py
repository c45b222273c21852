"""`qlora-flow`'s flow commands take their flow's parameters: one description (the flow's signature and docstring)
for the command line and for a deployment's parameter form."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import FLOW_COMMANDS, _parser
from flows.flow_options import flow_arguments, flow_parameter_schema

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("target", sorted({c.flow for c in FLOW_COMMANDS.values()}))
def test_options_read_from_the_source_are_the_flows_own_parameters(target):
    """The schema read from the flow's source (no import) is the one Prefect builds from the flow object, for every
    parameter that has a command-line form; the others are objects (a validated config, a sweep's trial)."""
    module, name = target.split(":")
    flow = getattr(importlib.import_module(module), name)
    prefect_schema = flow.parameters.model_dump()["properties"]
    from_source = flow_parameter_schema(target)["properties"]
    assert from_source == {k: v for k, v in prefect_schema.items() if k in from_source}
    left_out = set(prefect_schema) - set(from_source)
    assert all("$ref" in str(prefect_schema[k]) for k in left_out), left_out


def test_command_lines_become_the_flows_arguments():
    run = _parser(["run"]).parse_args(["run", "--config", "c.yaml", "--set", "a.b=1", "--set", "c.d=2", "--no-resume"])
    assert flow_arguments(run) == {"config_path": "c.yaml", "overrides": ["a.b=1", "c.d=2"], "resume": "never"}
    run = _parser(["run"]).parse_args(["run", "--resume", "outputs/x"])
    assert flow_arguments(run) == {"config_path": "pipeline_config/default.yaml", "resume_dir": "outputs/x"}
    merge = _parser(["merge"]).parse_args(["merge", "--model", "m", "--no-register", "--dtype", "fp32"])
    assert flow_arguments(merge) == {
        "model": "m",
        "dtype": "fp32",
        "max_loss_change_pct": 1.0,
        "min_agreement": 0.9,
        "register_model": False,
    }
    sweep = _parser(["sweep"]).parse_args(["sweep", "--space", "s.yaml", "--debug"])
    assert sweep.debug and flow_arguments(sweep)["space_path"] == "s.yaml"
    with pytest.raises(SystemExit):
        _parser(["merge"]).parse_args(["merge", "--dtype", "int3"])  # choices from the flow's Literal


def test_a_flow_commands_help_imports_no_model_library():
    """`run --help` (and a run that finds a service down) answers before the pipeline's libraries load."""
    check = (
        "import sys\nfrom flows.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'flows.finetune') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--no-resume" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"
