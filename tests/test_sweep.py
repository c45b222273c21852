"""Sweeps (flows/sweep.py): the space file, the samplers, and 3-trial sweeps of the tiny model under a real Prefect
server and a SQLite MLflow store: parent and child runs with the right params, the best trial registered, a trial
forced to fail recorded FAILED while the sweep completes, a hopeless trial pruned, and a sweep stopped half-way
continued without running its finished trials again."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline_config.loading import CONFIG_DIR, load_pipeline_config
from pipeline_config.sweep import load_sweep_space
from tests.conftest import start_in_own_session, stop_process_group, task_graph, tiny_config_dict

REPO = Path(__file__).resolve().parent.parent
SHIPPED_SPACES = sorted((CONFIG_DIR / "sweeps").glob("*.yaml"))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tiny_config(tiny_llama_dir, tmp_path, **training) -> Path:
    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    raw["training"].update(save_steps=2, **training)
    raw["evaluation"].update(max_loss_rows=8, max_generation_rows=1)
    raw["tracking"]["system_metrics"] = False
    raw["registry"] = {"model_name": "tiny-sweep", "max_new_tokens": 8}
    return _write(tmp_path / "tiny.yaml", raw)


def _children(client: MlflowClient, parent_id: str) -> list:
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100
    )
    return sorted(runs, key=lambda r: (int(r.data.tags["sweep.trial_number"]), r.info.start_time))


# --- the space file (fast) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED_SPACES, ids=lambda p: p.name)
def test_shipped_space_validates_and_opens_with_its_command(path: Path):
    first_lines = path.read_text().splitlines()[:3]
    commands = [line for line in first_lines if "qlora-flow sweep --config pipeline_config/" in line]
    assert commands and f"--space pipeline_config/sweeps/{path.name}" in commands[0]
    config = commands[0].split("--config ")[1].split()[0]
    space = load_sweep_space(path, load_pipeline_config(REPO / config))
    assert space.n_trials >= 2 and space.parameters


def test_space_is_resolved_against_its_config(tiny_config_file, tmp_path):
    cfg = load_pipeline_config(tiny_config_file)
    space_file = _write(
        tmp_path / "space.yaml",
        {
            "method": "random",
            "n_trials": 5,
            "parameters": {
                "training.learning_rate": "loguniform(1e-5, 1e-3)",
                "lora.r": [4, 8],
                "lora.dropout": "uniform(0, 0.2)",
                "training.max_steps": "int(2, 6)",
            },
            "overrides": {"training.warmup_ratio": 0.1},
        },
    )
    space = load_sweep_space(space_file, cfg)
    assert space.n_trials == 5 and space.grid_size is None
    assert [p.describe() for p in space.parameters.values()] == [
        "loguniform(1e-05, 0.001)",
        "[4, 8]",
        "uniform(0, 0.2)",
        "int(2, 6)",
    ]
    assert space.base.training.warmup_ratio == 0.1 and space.base.lora.r == cfg.lora.r
    # the config's registry rule is the sweep's metric unless the space names one
    assert (space.metric, space.greater_is_better) == (cfg.registry.metric, cfg.registry.greater_is_better)
    flat = space.flat()
    assert flat["sweep.parameters.lora.r"] == "[4, 8]" and flat["sweep.method"] == "random"


def test_nested_overrides_set_their_keys_and_keep_the_rest_of_the_section(tiny_config_file, tmp_path):
    cfg = load_pipeline_config(tiny_config_file)
    space_file = _write(
        tmp_path / "space.yaml",
        {"parameters": {"lora.r": [4, 8]}, "overrides": {"training": {"max_steps": 3}, "lora": {"dropout": 0.1}}},
    )
    base = load_sweep_space(space_file, cfg).base
    assert base.training.max_steps == 3 and base.lora.dropout == 0.1
    # the rest of each section is the config's, not the schema's defaults
    assert base.training.learning_rate == cfg.training.learning_rate == 3e-3
    assert base.training.output_dir == cfg.training.output_dir and base.lora.alpha == cfg.lora.alpha == 16


def test_samplers_draw_the_same_trials_after_a_restart(tiny_config_file, tmp_path):
    """Random: a study continued from its journal by a new process draws what an uninterrupted one would have.
    Grid: every combination once, in the order listed, after a restart too."""
    from qlora.sweep import ask_trial, open_study

    cfg = load_pipeline_config(tiny_config_file)
    params = {"training.learning_rate": "loguniform(1e-5, 1e-3)", "lora.r": [4, 8, 16]}
    space = load_sweep_space(
        _write(tmp_path / "random.yaml", {"method": "random", "n_trials": 4, "seed": 7, "parameters": params}), cfg
    )
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = open_study(space, tmp_path / "a")
    drawn = [ask_trial(straight, space).params for _ in range(4)]
    assert len({p["training.learning_rate"] for p in drawn}) == 4
    first = open_study(space, tmp_path / "b")
    again = [ask_trial(first, space).params for _ in range(2)]
    continued = open_study(space, tmp_path / "b")  # a new study object on the same journal, as after a crash
    again += [ask_trial(continued, space).params for _ in range(2)]
    assert again == drawn

    grid = load_sweep_space(
        _write(tmp_path / "grid.yaml", {"parameters": {"lora.r": [4, 8], "training.learning_rate": [1e-3, 1e-4]}}),
        cfg,
    )
    (tmp_path / "g").mkdir(), (tmp_path / "h").mkdir()
    study = open_study(grid, tmp_path / "g")
    order = [(p["lora.r"], p["training.learning_rate"]) for p in (ask_trial(study, grid).params for _ in range(4))]
    assert order == [(4, 1e-3), (4, 1e-4), (8, 1e-3), (8, 1e-4)]
    first = open_study(grid, tmp_path / "h")
    again = [ask_trial(first, grid).params for _ in range(3)]
    again.append(ask_trial(open_study(grid, tmp_path / "h"), grid).params)
    assert [(p["lora.r"], p["training.learning_rate"]) for p in again] == order


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")  # the task runs alone here
def test_trials_in_flight_are_bounded_by_the_gpu_slots(prefect_server, tiny_config_file, tmp_path):
    """Through a deployment: as many trials at once as the GPU limit has slots for (training.gpu_slots each), never
    more than max_parallel_trials; in the sweep's own process one at a time; a missing deployment is bad input."""
    import uuid

    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.finetune import finetune
    from qlora.errors import PipelineInputError
    from tasks.sweep import plan_trial_slots_task

    name = f"trials-{uuid.uuid4().hex[:8]}"
    finetune.to_deployment(name=name).apply()
    limit = f"gpu-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=4))

    def slots(gpu_slots: int, **space) -> int:
        cfg = load_pipeline_config(
            tiny_config_file, [f"training.gpu_concurrency_limit={limit}", f"training.gpu_slots={gpu_slots}"]
        )
        path = _write(tmp_path / "space.yaml", {"parameters": {"lora.r": [4, 8]}, **space})
        return plan_trial_slots_task(load_sweep_space(path, cfg), f"qlora-finetune/{name}")

    assert slots(1) == 4 and slots(2) == 2 and slots(3) == 1
    assert slots(1, max_parallel_trials=3) == 3 and slots(2, max_parallel_trials=3) == 2
    cfg = load_pipeline_config(tiny_config_file)
    space = load_sweep_space(_write(tmp_path / "one.yaml", {"parameters": {"lora.r": [4, 8]}}), cfg)
    assert plan_trial_slots_task(space, None) == 1
    with pytest.raises(PipelineInputError, match="trial deployment 'qlora-finetune/nope' not found"):
        plan_trial_slots_task(space, "qlora-finetune/nope")


# --- sweeps of the tiny model (slow) -----------------------------------------------------------------------------

FAIL_LR = 2e-3  # the trial with this learning rate is forced to fail (test_three_trials...)
# The sweep's graph in the Prefect UI (see tests/test_flow.py's STEP_INPUTS): each step drawn from the steps whose
# results it uses.
SWEEP_STEP_INPUTS = {
    "validate-sweep-space": {"validate-config"},
    "resolve-model-source": {"validate-sweep-space"},
    "setup-tokenizer": {"resolve-model-source"},
    "prepare-dataset": {"setup-tokenizer"},
    "open-prepared-dataset": {"prepare-dataset"},
    "preflight": {"resolve-model-source", "setup-tokenizer", "open-prepared-dataset"},
    "plan-trial-slots": {"validate-sweep-space"},
    "claim-sweep-folder": {"resolve-model-source", "open-prepared-dataset"},
    "open-study": {"claim-sweep-folder"},
    "run-trial": {"validate-sweep-space"},
    "register-best-trial": {"resolve-model-source", "claim-sweep-folder", "open-study"},
    "log-sweep-results": {"open-study", "register-best-trial"},
    "publish-sweep-summary": {"claim-sweep-folder", "open-study", "log-sweep-results", "register-best-trial"},
    "finish-sweep": {"claim-sweep-folder", "open-study"},
}


@pytest.mark.slow
def test_three_trials_parent_and_children_best_registered_failed_trial_recorded(
    prefect_server, tiny_llama_dir, tmp_path, monkeypatch
):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter

    from flows.sweep import sweep
    from qlora import train

    original = train.train_adapter

    def fail_one(model, data, tokenizer, lora_cfg, cfg, *args, **kwargs):
        if cfg.learning_rate == FAIL_LR:
            raise RuntimeError("forced trial failure (test)")
        return original(model, data, tokenizer, lora_cfg, cfg, *args, **kwargs)

    monkeypatch.setattr(train, "train_adapter", fail_one)
    config = _tiny_config(tiny_llama_dir, tmp_path, max_steps=6)
    lrs = [3e-3, FAIL_LR, 1e-4]
    space = _write(
        tmp_path / "space.yaml",
        {"parameters": {"training.learning_rate": lrs}, "metric": "finetuned_eval_loss"},
    )

    summary = sweep(config_path=str(config), space_path=str(space))

    cfg = load_pipeline_config(config)
    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.parameters.training.learning_rate"] == str(lrs)
    assert parent.data.params["sweep.metric"] == "finetuned_eval_loss"
    assert "training.learning_rate" not in parent.data.params  # swept: each child has its own
    assert {"sweep_results.json", "sweep_results.png", "sweep_results.md", "sweep_space.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = _children(client, parent.info.run_id)
    assert [c.data.tags["sweep.trial_number"] for c in children] == ["0", "1", "2"]
    by_lr = {float(c.data.params["training.learning_rate"]): c for c in children}
    assert sorted(by_lr) == sorted(lrs)  # each grid value once, in its own child run
    assert [by_lr[lr].info.status for lr in lrs] == ["FINISHED", "FAILED", "FINISHED"]
    assert "forced trial failure" in by_lr[FAIL_LR].data.tags["sweep.error"]
    assert [by_lr[lr].data.tags["sweep.trial_state"] for lr in lrs] == ["COMPLETE", "FAIL", "COMPLETE"]
    for child in children:  # every trial trained in its own folder of the sweep folder
        assert child.data.params["training.output_dir"].startswith(summary["sweep_dir"])
        assert child.data.params["registry.enabled"] == "False"
    losses = {c.info.run_id: c.data.metrics["finetuned_eval_loss"] for c in children if c.info.status == "FINISHED"}
    best_run = min(losses, key=losses.get)
    assert losses[best_run] < max(losses.values())  # the trials really differ

    # the best trial by the metric is registered from its own run, champion by the usual rule
    version = client.get_model_version_by_alias("tiny-sweep", "champion")
    assert version.run_id == best_run
    assert client.get_run(best_run).info.end_time < version.creation_timestamp  # registering kept the trial's end
    assert float(version.tags["metric.finetuned_eval_loss"]) == pytest.approx(losses[best_run], rel=1e-5)
    assert summary["best"]["mlflow_run_id"] == best_run and summary["registry"]["became_champion"]
    assert parent.data.tags["sweep.best_run_id"] == best_run
    assert parent.data.metrics["best_finetuned_eval_loss"] == pytest.approx(losses[best_run])
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_complete"] == 2

    # Prefect: the sweep completed; each trial is a finetune subflow run, the forced one Failed
    sweep_run_id = parent.data.tags["prefect.flow_run_id"]
    # (a trial's subflow run, qlora-finetune-<id> in this graph, hangs off its run-trial; Prefect also draws edges into
    # it from whichever step results share an object with the trial's config: those are not the sweep's steps)
    graph = task_graph(sweep_run_id)
    steps = {edge for edge in graph if not edge[1].startswith("qlora-finetune")}
    assert steps == {(up, step) for step, ups in SWEEP_STEP_INPUTS.items() for up in ups}
    assert sum(edge[0] == "run-trial" and edge[1].startswith("qlora-finetune") for edge in graph) == 3
    with get_client(sync_client=True) as prefect:
        sweep_run = prefect.read_flow_run(sweep_run_id)
        assert sweep_run.state.is_completed()
        trial_runs = {
            str(c.data.tags["prefect.flow_run_id"]): c for c in children if "prefect.flow_run_id" in c.data.tags
        }
        states = {}
        for run in prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id={"any_": list(trial_runs)})):
            assert run.parent_task_run_id is not None
            states[trial_runs[str(run.id)].data.tags["sweep.trial_number"]] = run.state.type.value
        failed = by_lr[FAIL_LR].data.tags["sweep.trial_number"]
        assert states == {n: "FAILED" if n == failed else "COMPLETED" for n in ("0", "1", "2")}
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[sweep_run_id]))
        )
    summary_md = next(a.data for a in artifacts if a.key == "qlora-sweep-summary")
    best_number = int(children[[c.info.run_id for c in children].index(best_run)].data.tags["sweep.trial_number"])
    assert f"**{best_number} (best)**" in summary_md and "FAILED: " in summary_md
    assert Path(summary["sweep_dir"], "RUN_FINISHED").is_file()


def _finished_trials(sweeps: Path) -> int:
    from qlora.trial import STUDY_JOURNAL, journal_storage

    journals = list(sweeps.glob(f"*/{STUDY_JOURNAL}"))
    if not journals:
        return 0
    folder = journals[0].parent
    study = optuna.load_study(study_name=folder.name, storage=journal_storage(folder))
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


@pytest.mark.slow
def test_sweep_killed_half_way_continues_without_running_finished_trials_again(
    prefect_server, tiny_llama_dir, tmp_path
):
    """SIGTERM to a 3-trial sweep's process group (what `timeout` and systemd send) once two trials are told: the
    trial in flight stops at its next step and the sweep exits 143 within the grace period, its parent run KILLED.
    The re-run continues the same sweep (same folder, parent run and study), runs only the third trial, whose eval
    loss (learning rate ~0) its pruner finds hopeless next to the first two, and registers the best of those."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.settings import get_current_settings

    from flows.sweep import sweep

    config = _tiny_config(tiny_llama_dir, tmp_path, max_steps=8, logging_steps=1)
    lrs = [1e-3, 3e-3, 1e-9]
    space = _write(
        tmp_path / "space.yaml",
        {
            "parameters": {"training.learning_rate": lrs},
            "metric": "finetuned_eval_loss",
            "pruning": {"pruner": "median", "eval_every_steps": 2, "eval_rows": 8, "n_startup_trials": 2},
        },
    )
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "killed.log"
    proc = start_in_own_session(
        [sys.executable, "-m", "flows.sweep", "--config", str(config), "--space", str(space)], log, env
    )
    sweeps = tmp_path / "out" / "sweeps"
    try:
        deadline = time.monotonic() + 300
        while _finished_trials(sweeps) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "two trials did not finish within 300 s"
            time.sleep(0.2)
        time.sleep(3)  # the third trial starts
    finally:
        code, took_s = stop_process_group(proc, signal.SIGTERM)
    assert code == 143 and took_s < 25, (code, took_s, log.read_text()[-3000:])
    (killed,) = [p for p in sweeps.iterdir() if p.is_dir()]
    assert not (killed / "RUN_FINISHED").exists()
    cfg = load_pipeline_config(config)
    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id
    (parent_before,) = [r for r in client.search_runs([experiment]) if "sweep.dir" in r.data.tags]
    assert parent_before.info.status == "KILLED"
    done_before = {c.data.tags["sweep.trial_number"]: c for c in _children(client, parent_before.info.run_id)}
    assert [done_before[n].info.status for n in ("0", "1")] == ["FINISHED", "FINISHED"]
    folders_before = {n: sorted((killed / f"trial-{n}").iterdir()) for n in ("0", "1")}

    summary = sweep(config_path=str(config), space_path=str(space))

    assert summary["sweep_dir"] == str(killed) and summary["sweep_dir_reason"].startswith("resuming")
    assert summary["mlflow_run_id"] == parent_before.info.run_id  # one parent run per sweep, continued
    parent = client.get_run(parent_before.info.run_id)
    assert parent.info.status == "FINISHED"
    children = _children(client, parent.info.run_id)
    by_trial: dict[str, list] = {}
    for child in children:
        by_trial.setdefault(child.data.tags["sweep.trial_number"], []).append(child)
    # the finished trials were not run again: the same single run each, and nothing new in their folders
    for n in ("0", "1"):
        assert [c.info.run_id for c in by_trial[n]] == [done_before[n].info.run_id]
        assert sorted((killed / f"trial-{n}").iterdir()) == folders_before[n]
    last = by_trial["2"][-1]
    assert last.info.status == "FINISHED" and float(last.data.params["training.learning_rate"]) == lrs[2]
    assert all(c.info.status == "KILLED" for c in by_trial["2"][:-1])  # an attempt the stop interrupted, if any
    # the hopeless trial was pruned: it stopped early, at a step its pruner checked
    rows = {r["trial"]: r for r in summary["trials"]}
    assert [rows[n]["state"] for n in (0, 1, 2)] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned_at = int(last.data.tags["sweep.pruned_at_step"])
    assert pruned_at % 2 == 0 and pruned_at < 8 and last.data.metrics["train_steps"] == pruned_at
    reported = client.get_metric_history(last.info.run_id, "sweep_eval_loss")
    assert [m.step for m in reported][-1] == pruned_at
    losses = {n: rows[n]["finetuned_eval_loss"] for n in (0, 1)}
    best = min(losses, key=losses.get)
    assert summary["best"]["trial"] == best
    assert client.get_model_version_by_alias("tiny-sweep", "champion").run_id == rows[best]["mlflow_run_id"]

    # Prefect: the continued sweep's flow run ran one trial, trial 2
    with get_client(sync_client=True) as prefect:
        resumed_id = parent.data.tags["prefect.flow_run_id"]
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [resumed_id]}))
        assert sorted(t.name for t in tasks if t.name.startswith("run-trial")) == ["run-trial-2"]


def test_two_sweeps_at_once_get_folders_of_their_own(tiny_config_file, tmp_path):
    """A sweep's state (folder, lock, study journal, fingerprint) is its own: a second sweep of the same config and
    space started while the first holds its folder gets a new one; once both let go, the next continues the newest
    unfinished one; another space never continues it."""
    from qlora.sweep import claim_sweep_folder, open_study, sweep_fingerprint
    from qlora.trial import STUDY_JOURNAL

    cfg = load_pipeline_config(tiny_config_file)
    space = load_sweep_space(_write(tmp_path / "a.yaml", {"parameters": {"lora.r": [4, 8]}}), cfg)
    fingerprint = sweep_fingerprint(space, "data-digest", "model-digest")
    first = claim_sweep_folder(space, fingerprint, "first", {}, "auto", None)
    second = claim_sweep_folder(space, fingerprint, "second", {}, "auto", None)
    assert first.path != second.path and first.path.parent == second.path.parent == tmp_path / "out" / "sweeps"
    assert "held by a live process" in second.reason
    studies = [open_study(space, f.path) for f in (first, second)]
    assert [s.study_name for s in studies] == [first.path.name, second.path.name]
    assert all((f.path / STUDY_JOURNAL).is_file() for f in (first, second))
    studies[0].ask()  # one sweep's trial is not the other's
    assert len(studies[1].get_trials(states=(optuna.trial.TrialState.RUNNING,))) == 0
    first.release(), second.release()

    again = claim_sweep_folder(space, fingerprint, "third", {}, "auto", None)
    assert again.path == second.path and again.reason.startswith("resuming")
    again.release()
    other = load_sweep_space(_write(tmp_path / "b.yaml", {"parameters": {"lora.r": [4, 16]}}), cfg)
    fresh = claim_sweep_folder(
        other, sweep_fingerprint(other, "data-digest", "model-digest"), "fourth", {}, "auto", None
    )
    assert fresh.path not in (first.path, second.path)
    assert "space.parameters.lora.r: [4, 8] -> [4, 16]" in fresh.reason
    fresh.release()
