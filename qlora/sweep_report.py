"""What a sweep reports: the trials as rows (params, state, metric, steps, runs), the best one marked, as a
markdown table, a plot, and the MLflow parent run's table / plot / metrics (the Prefect summary artifact is the
markdown, published by tasks/sweep.py)."""

from __future__ import annotations

from typing import Any

import mlflow
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline_config.sweep import SweepSpace
from qlora.sweep import ERROR_ATTR, FLOW_RUN_ATTR, MLFLOW_RUN_ATTR, best_trial

RESULTS_TABLE = "sweep_results.json"
RESULTS_MARKDOWN = "sweep_results.md"
RESULTS_PLOT = "sweep_results.png"
SPACE_ARTIFACT = "sweep_space.yaml"
STATE_NAMES = {
    TrialState.COMPLETE: "COMPLETE",
    TrialState.PRUNED: "PRUNED",
    TrialState.FAIL: "FAILED",
    TrialState.RUNNING: "RUNNING",
    TrialState.WAITING: "WAITING",
}


def _value(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def trial_rows(study: optuna.Study, space: SweepSpace) -> list[dict[str, Any]]:
    """One row per trial, in trial order: number, state, the swept values, the sweep's metric, eval loss / exact
    match / steps trained from the trial's MLflow run, where it stopped if pruned, its runs, and `best`."""
    best = best_trial(study)
    client = MlflowClient()
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get(MLFLOW_RUN_ATTR)
        metrics = client.get_run(run_id).data.metrics if run_id else {}
        row: dict[str, Any] = {"trial": t.number, "state": STATE_NAMES.get(t.state, t.state.name)}
        row |= {key: t.params.get(key) for key in space.parameters}
        row[space.metric] = metrics.get(space.metric) if t.state != TrialState.FAIL else None
        for key in ("finetuned_eval_loss", "finetuned_exact_match"):
            if key != space.metric:
                row[key] = metrics.get(key) if t.state != TrialState.FAIL else None
        steps = metrics.get("train_steps")
        row["steps"] = int(steps) if steps is not None else None
        row["pruned_at_step"] = t.last_step if t.state == TrialState.PRUNED else None
        row["best"] = best is not None and t.number == best.number
        row["mlflow_run_id"] = run_id
        row["prefect_flow_run_id"] = t.user_attrs.get(FLOW_RUN_ATTR)
        row["error"] = t.user_attrs.get(ERROR_ATTR)
        rows.append(row)
    return rows


def results_markdown(
    rows: list[dict[str, Any]], space: SweepSpace, registered: str | None = None, bold: bool = True
) -> str:
    """The trials as a markdown table, the best one marked (and in bold, for a page that renders it)."""
    direction = "higher" if space.greater_is_better else "lower"
    metric_cols = [space.metric] + [k for k in ("finetuned_eval_loss", "finetuned_exact_match") if k != space.metric]
    cols = ["trial", "state", *space.parameters, *metric_cols, "steps"]
    lines = [
        f"Sweep: {space.config.method}, {space.n_trials} trials; `{space.metric}` picks the best "
        f"({direction} is better)",
        "",
        "| " + " | ".join(cols) + " | MLflow run |",
        "|" + " --- |" * (len(cols) + 1),
    ]
    for row in rows:
        cells = [_value(row.get(c)) if row.get(c) is not None else "" for c in cols]
        if row["pruned_at_step"] is not None:
            cells[cols.index("steps")] = f"{row['steps']} (pruned)"
        if row["error"]:
            cells[cols.index("state")] = f"FAILED: {row['error'][:80]}"
        cells.append(f"`{row['mlflow_run_id']}`" if row["mlflow_run_id"] else "")
        if row["best"]:
            cells[0] = f"{row['trial']} (best)"
            if bold:
                cells = [f"**{c}**" if c != "" else c for c in cells]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    best = next((r for r in rows if r["best"]), None)
    lines.append("")
    if best is None:
        lines.append("No trial completed: nothing registered.")
    else:
        lines.append(f"Best: trial {best['trial']}, {space.metric} {best[space.metric]:.4g}.")
    if registered:
        lines.append(registered)
    return "\n".join(lines)


def registered_line(space: SweepSpace, study: optuna.Study, decision) -> str | None:
    """One line on what the registry did with the best trial; None when nothing was registered."""
    if decision is None:
        return None
    from qlora.registry import default_model_name

    name = space.base.registry.model_name or default_model_name(space.base)
    role = "champion" if decision.became_champion else "challenger"
    return (
        f"Registry: trial {best_trial(study).number}'s adapter is `{name}` version {decision.version}, **{role}** "
        f"({decision.reason})."
    )


def summary_markdown(
    space: SweepSpace, rows: list[dict[str, Any]], sweep_dir: str, parent_run_id: str, registered: str | None
) -> str:
    """The sweep's summary page (the Prefect artifact): where it ran, then the trials."""
    return "\n".join(
        [
            f"# Sweep of `{space.base.model.name_or_path}` on `{space.base.data.source}`",
            f"- space: `{space.source}`; sweep folder: `{sweep_dir}`",
            f"- MLflow parent run: `{parent_run_id}` (each trial a child run)",
            "",
            results_markdown(rows, space, registered),
        ]
    )


def results_figure(study: optuna.Study, space: SweepSpace, rows: list[dict[str, Any]]):
    """Left: each trial's reported eval loss by step (pruned trials dashed, the best one thick). Right: each
    trial's metric as its run logged it (`rows`; a pruned trial's at the step it stopped, failed trials have none),
    the best one highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_trial(study)
    trials = study.get_trials(deepcopy=False)
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for t in trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        is_best = best is not None and t.number == best.number
        curves.plot(
            steps,
            [t.intermediate_values[s] for s in steps],
            marker="o",
            markersize=3,
            linestyle="--" if t.state == TrialState.PRUNED else "-",
            linewidth=3 if is_best else 1.2,
            label=f"trial {t.number} ({STATE_NAMES.get(t.state, t.state.name).lower()})",
        )
    curves.set(xlabel="optimizer step", ylabel="eval loss (reported)", title="eval loss while training")
    if curves.lines:
        curves.legend(fontsize=8)
    else:
        curves.text(0.5, 0.5, "no pruning: no eval loss during training", ha="center", transform=curves.transAxes)
    curves.grid(alpha=0.3)
    colors = {TrialState.COMPLETE: "tab:blue", TrialState.PRUNED: "tab:orange", TrialState.FAIL: "tab:red"}
    numbers = [t.number for t in trials]
    logged = {r["trial"]: r[space.metric] for r in rows}
    values = [logged.get(t.number) or 0.0 for t in trials]
    bar_colors = [
        "tab:green" if best is not None and t.number == best.number else colors.get(t.state, "gray") for t in trials
    ]
    bars.bar([str(n) for n in numbers], values, color=bar_colors)
    for t, v in zip(trials, values, strict=True):
        label = "failed" if t.state == TrialState.FAIL else f"{v:.3g}"
        bars.annotate(label, (str(t.number), v), ha="center", va="bottom", fontsize=8)
    bars.set(xlabel="trial (green: best, orange: pruned, red: failed)", ylabel=space.metric, title=space.metric)
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def log_sweep_results(study: optuna.Study, space: SweepSpace, registered: str | None = None) -> list[dict]:
    """The results table (MLflow table + markdown), the plot and the counts into the active (parent) run; each
    call replaces the previous ones, so the parent shows the sweep's progress. Returns the rows."""
    import matplotlib.pyplot as plt

    rows = trial_rows(study, space)
    columns = {key: [_value(r[key]) for r in rows] for key in rows[0]} if rows else {"trial": []}
    mlflow.log_table(columns, artifact_file=RESULTS_TABLE)
    mlflow.log_text(results_markdown(rows, space, registered), RESULTS_MARKDOWN)
    fig = results_figure(study, space, rows)
    mlflow.log_figure(fig, RESULTS_PLOT)
    plt.close(fig)
    states = [r["state"] for r in rows]
    mlflow.log_metrics({f"trials_{s.lower()}": float(states.count(s)) for s in ("COMPLETE", "PRUNED", "FAILED")})
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        mlflow.log_metric(f"best_{space.metric}", best[space.metric])
        mlflow.set_tags({"sweep.best_trial": str(best["trial"]), "sweep.best_run_id": best["mlflow_run_id"]})
    return rows


def sweep_summary_text(summary: dict, space, tracking_uri: str, wall_s: float) -> str:
    """What `qlora-flow sweep` prints when the flow has finished."""
    lines = ["", "=== QLoRA sweep summary ===", results_markdown(summary["trials"], space, bold=False)]
    lines.append(f"sweep folder: {summary['sweep_dir']} ({summary['sweep_dir_reason']})")
    lines.append(
        f"MLflow parent run: {summary['mlflow_run_id']} (experiment {summary['mlflow_experiment_id']}) in "
        f"{tracking_uri}; each trial is a child run"
    )
    if summary.get("registry"):
        reg = summary["registry"]
        role = "champion" if reg["became_champion"] else "challenger"
        lines.append(
            f"registered: {summary['registered_model']} v{reg['version']} (trial {summary['best']['trial']}) -> "
            f"{role} ({reg['reason']})"
        )
    lines.append(f"sweep wall time: {wall_s:.0f} s")
    return "\n".join(lines)
