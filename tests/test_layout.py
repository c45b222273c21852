"""The tree says what each module is (docs/architecture.md): Prefect steps only in tasks/, plain functions in qlora/
with no Prefect import, library internals only in qlora/integrations/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _decorators(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                found.add(ast.unparse(target))
    return found


def test_plain_functions_import_no_prefect():
    offenders = {
        str(p.relative_to(REPO)): sorted(n for n in _imports(p) if n.split(".")[0] == "prefect")
        for p in (REPO / "qlora").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_prefect_tasks_live_in_tasks_only():
    for folder in ("qlora", "flows", "bench", "pipeline_config"):
        for path in (REPO / folder).rglob("*.py"):
            assert "task" not in _decorators(path), f"{path.relative_to(REPO)} defines a Prefect task"
    wrappers = [p for p in (REPO / "tasks").glob("*.py") if "task" in _decorators(p)]
    assert len(wrappers) >= 10


def test_private_overrides_only_in_integrations():
    """Subclassing a library's trainer or setting its private attributes happens in qlora/integrations/ only."""
    for path in (REPO / "qlora").rglob("*.py"):
        if "integrations" in path.parts:
            continue
        text = path.read_text()
        needles = ("def _save_checkpoint", "def _load_from_checkpoint", "_attn_implementation =", "_skip_type_hint")
        for needle in needles:
            assert needle not in text, f"{path.relative_to(REPO)}: {needle}"


def test_a_single_fine_tune_imports_nothing_of_the_sweep():
    """A fine-tune (flows/finetune.py, which a sweep's trials also run) needs of the sweep only its `trial` parameter
    and the trial's pruning callback (qlora/trial.py, tasks/trial.py): Optuna and the sweep's machinery are never
    imported by it (a GPU run on a machine without Optuna once failed on that import)."""
    import subprocess
    import sys

    sweep = ("optuna", "qlora.sweep", "tasks.sweep", "pipeline_config.sweep")
    check = f"import sys, flows.finetune; print(sorted(m for m in {sweep!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
