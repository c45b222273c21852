"""The sweep flow: many fine-tunes of one config, varying what a space file says; the best one registered.

    qlora-flow sweep --config pipeline_config/default.yaml --space pipeline_config/sweeps/default-space.yaml
    prefect deployment run qlora-sweep/qlora-sweep          (prefect.yaml's deployment: trials on the workers)

Steps, in order (tasks/sweep.py over qlora/sweep.py; the preparation steps are the finetune flow's):
  validate-config -> validate-sweep-space (every problem with its line) -> resolve-model-source -> setup-tokenizer ->
  prepare-dataset -> open-prepared-dataset -> preflight -> plan-trial-slots -> claim-sweep-folder (this sweep's
  own folder, locked: a crashed sweep of the same config and space is continued) -> [MLflow parent run] open-study
  -> run-trial x n_trials (each a `qlora-finetune` flow run: a subflow here, or a run of `trial_deployment` on a
  worker; at most as many at once as the GPU slots allow; a failed trial is recorded and the sweep goes on) ->
  register-best-trial (champion rule) -> log-sweep-results -> publish-sweep-summary -> finish-sweep
Steps get `opaque(...)` of the step results they use and `quote(...)` of the settings (config, space), as in the
finetune flow (its docstring says why): the run's graph in the Prefect UI shows the pipeline.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.utilities.annotations import opaque, quote

from flows.finetune import finetune, prepare_inputs
from pipeline_config.schema import PipelineConfig
from qlora.model import pick_device
from qlora.registry import default_model_name
from tasks.config import validate_config_task
from tasks.stopping import stop_on_signals
from tasks.sweep import (
    claimed_sweep_folder,
    finish_sweep_task,
    log_sweep_results_task,
    open_study_task,
    plan_trial_slots_task,
    publish_sweep_summary_task,
    register_best_trial_task,
    run_trials,
    sweep_parent_run,
    validate_sweep_space_task,
)


@flow(name="qlora-sweep")
def sweep(
    config_path: str = "pipeline_config/default.yaml",
    space_path: str = "pipeline_config/sweeps/default-space.yaml",
    overrides: list[str] | None = None,
    resume: Literal["auto", "never"] = "auto",
    resume_dir: str | None = None,
    trial_deployment: str | None = None,
    config: PipelineConfig | None = None,
) -> dict:
    """Run the trials of `space_path` on `config_path`, register the best one; returns the trials and the best.

    Args:
        config_path: the config every trial starts from, relative to the working folder.
        space_path: the search space (pipeline_config/sweep.py says what it holds).
        overrides: `section.key=value` overrides of the config, validated with it; repeatable.
        resume: 'never' (--no-resume) always starts a new sweep; 'auto' continues the newest unfinished sweep of
            the same config and space that no live process holds (its finished trials are not run again).
        resume_dir: continue this sweep folder (refused if it is another sweep's).
        trial_deployment: run each trial as a flow run of this finetune deployment ('flow/deployment', e.g.
            qlora-finetune/qlora-default), picked up by workers; unset: as subflows in this process.
        config: an already validated config; `config_path` and `overrides` are then not read.
    """
    space = validate_sweep_space_task(space_path, opaque(validate_config_task(config, config_path, overrides)))
    cfg = space.base  # the config with the space's overrides: what every trial starts from
    device = pick_device(cfg.training.device)
    with stop_on_signals(cfg.training.stop_grace_s):  # a stop reaches every trial in flight (run_trials)
        # the finetune flow's first steps, preflight included, on the trials' config
        source, _, _, data = prepare_inputs(cfg, device, config_step=space)
        parallel = plan_trial_slots_task(quote(space), trial_deployment, wait_for=[opaque(space)])
        with (
            claimed_sweep_folder(space, data.digest, source.digest or "", resume, resume_dir) as folder,
            sweep_parent_run(space, folder) as parent,
        ):
            study = open_study_task(quote(space), opaque(folder))
            run_trials(study, space, folder, parent, finetune, trial_deployment, parallel)
            decision = register_best_trial_task(opaque(study), quote(space), opaque(folder), opaque(source))
            rows = log_sweep_results_task(opaque(study), quote(space), opaque(decision))
            publish_sweep_summary_task(
                quote(space), opaque(study), opaque(rows), opaque(folder), opaque(parent), opaque(decision)
            )
            finish_sweep_task(opaque(study), opaque(folder))
    return {
        "trials": rows,
        "best": next((r for r in rows if r["best"]), None),
        "metric": space.metric,
        "greater_is_better": space.greater_is_better,
        "sweep_dir": str(folder.path),
        "sweep_dir_reason": folder.reason,
        "mlflow_run_id": parent.info.run_id,
        "mlflow_experiment_id": parent.info.experiment_id,
        "registry": decision.__dict__ if decision else None,
        "registered_model": cfg.registry.model_name or default_model_name(cfg),
    }


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["sweep", *__import__("sys").argv[1:]]))
