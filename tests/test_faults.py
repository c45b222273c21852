"""Faults found before anything runs, and outputs that are never overwritten: every case exits with its code and one
line naming what to fix, in seconds, with nothing deleted, half-written or registered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from pipeline_config.loading import ConfigError, load_pipeline_config, parse_override
from tests.conftest import free_port, tiny_config_dict

REPO = Path(__file__).resolve().parent.parent


def _cli(args: list[str], env: dict | None = None, cwd: Path = REPO, timeout: float = 120):
    """`qlora-flow ARGS` in a process of its own: (exit code, stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stderr, time.monotonic() - started


# --- --set values ------------------------------------------------------------------------------------------------


def test_set_null_unsets_an_optional_field(tmp_path):
    cfg = load_pipeline_config(None, ["model.gguf_file=null", "tracking.run_name=~"])
    assert cfg.model.gguf_file is None and cfg.tracking.run_name is None
    assert parse_override("data.response_template=[/INST]") == (["data", "response_template"], "[/INST]")


@pytest.mark.parametrize(
    "item, expected",
    [
        ("training.max_steps=[1, 2", "--set 'training.max_steps=[1, 2': the value is not a plain YAML value"),
        ("training.seed=!!python/name:os.system", "the value is not a plain YAML value"),
        ("lora.r", "expected section.key=value"),
    ],
)
def test_malformed_set_value_is_one_line(item, expected, capsys):
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load_pipeline_config(None, [item])
    assert expected in str(info.value)
    assert main(["validate", "--set", item]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_partial_overlap_of_held_out_and_training_rows_is_a_warning_with_its_share(tiny_llama_dir, tmp_path, capsys):
    rows = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[:1] + [json.dumps({"prompt": "x", "completion": "y"})]) + "\n")
    config = tiny_config_dict(tiny_llama_dir, tmp_path)
    config["data"] = {"source": str(tmp_path / "train.jsonl"), "eval_source": str(tmp_path / "eval.jsonl")}
    path = tmp_path / "overlap.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", "--config", str(path)]) == 0
    assert "warning: 1 of 2 held-out rows (50.0 %) are also training rows" in capsys.readouterr().out


# --- services that are down: found in seconds --------------------------------------------------------------------


@pytest.mark.slow
def test_services_down_are_found_in_seconds(tiny_config_file, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    code, err, seconds = _cli(["run", "--config", str(tiny_config_file), "--set", f"tracking.tracking_uri={down}"])
    assert code == 2 and f"the MLflow tracking server {down} does not answer" in err, err
    assert seconds < 10 and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    code, err, seconds = _cli(["run", "--config", str(tiny_config_file)], env={"PREFECT_API_URL": down + "/api"})
    assert code == 2 and f"the Prefect API {down}/api (PREFECT_API_URL) does not answer" in err, err
    assert seconds < 10

    code, err, seconds = _cli(["promote", "orders", "1", "--reason", "x", "--tracking-uri", down])
    assert code == 2 and "does not answer" in err and seconds < 10, err

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a"}\n')
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    code, err, _ = _cli(["emit-dataset-updated", str(data)], env={**env, "PREFECT_API_URL": ""})
    assert code == 2 and "needs the Prefect server the deployments run on: set PREFECT_API_URL" in err, err
    code, err, seconds = _cli(["emit-dataset-updated", str(data)], env={"PREFECT_API_URL": down + "/api"})
    assert code == 2 and "does not answer" in err and seconds < 10, err


@pytest.mark.slow
def test_temporary_server_that_does_not_start_in_time_says_what_to_do(tiny_config_file, tmp_path):
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "ph")}
    code, err, _ = _cli(
        ["run", "--config", str(tiny_config_file)],
        env={**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"},  # a new database takes longer
    )
    assert code == 2, err
    assert "the temporary Prefect server did not start within 1 s" in err and "`make server`" in err
    assert "Traceback" not in err


# --- outputs: nothing deleted or overwritten that the command did not write --------------------------------------


def test_compare_refuses_a_folder_it_did_not_write_before_loading_anything(tmp_path, capsys):
    precious = tmp_path / "outputs"
    (precious / "run-1").mkdir(parents=True)
    (precious / "run-1" / "adapter.safetensors").write_bytes(b"weights")
    (precious / "notes.txt").write_text("keep me")
    model = str(tmp_path / "no-such-adapter")  # never loaded: the output is checked first

    assert main(["compare", "--model", model, "--prompt", "hi", "--out-dir", str(precious)]) == 2
    assert "exists and is not empty: choose a new folder, or add --overwrite" in capsys.readouterr().err
    assert main(["compare", "--model", model, "--prompt", "hi", "--out-dir", str(precious), "--overwrite"]) == 2
    assert "holds files this command did not write: it is never replaced" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me" and (precious / "run-1" / "adapter.safetensors").exists()

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["compare", "--model", model, "--prompt", "hi", "--out-dir", str(a_file)]) == 2
    assert "is a file: give a folder path" in capsys.readouterr().err
    assert a_file.read_text() == "x"


def test_compare_report_folder_is_replaced_only_with_overwrite(tmp_path):
    from qlora.compare import ComparedPrompt, write_report
    from qlora.errors import PipelineInputError
    from qlora.inference import SamplingSettings

    rows = [ComparedPrompt("q", "base answer", "tuned answer", None)]
    out = tmp_path / "report"
    write_report(rows, out, "adapter", SamplingSettings(8, 0.0, 1.0, None), None)
    assert sorted(p.name for p in out.iterdir()) == ["compare.jsonl", "compare.md"]
    with pytest.raises(PipelineInputError, match="exists and is not empty"):
        write_report(rows, out, "adapter", SamplingSettings(8, 0.0, 1.0, None), None)
    rows[0].finetuned = "a new answer"
    write_report(rows, out, "adapter", SamplingSettings(8, 0.0, 1.0, None), None, overwrite=True)
    assert "a new answer" in (out / "compare.jsonl").read_text()


def test_generate_and_merge_outputs_are_checked_before_loading(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    model = str(tmp_path / "no-such-adapter")
    mine = tmp_path / "answers.jsonl"
    mine.write_text("not answers\n")
    assert main(["generate", "--model", model, "--prompts", str(prompts), "--output", str(mine), "--overwrite"]) == 2
    assert "holds files this command did not write" in capsys.readouterr().err
    assert mine.read_text() == "not answers\n"
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(["generate", "--model", model, "--prompts", str(prompts), "--output", str(folder)]) == 2
    assert "is a folder: give a file path" in capsys.readouterr().err

    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert main(["merge", "--model", model, "--output", str(blocker / "merged")]) == 2
    assert "is a file, so nothing can be created under it" in capsys.readouterr().err


def test_gc_and_runs_refuse_a_file_as_output_dir(tmp_path, capsys):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("x")
    assert main(["gc", "--keep", "0", "--output-dir", str(a_file)]) == 2
    assert "--output-dir" in capsys.readouterr().err and a_file.read_text() == "x"
    assert main(["runs", "--output-dir", str(a_file)]) == 2


# --- failures during and after training --------------------------------------------------------------------------


def _tiny(tiny_llama_dir, tmp_path, name: str, **training) -> Path:
    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    raw["training"].update(training)
    raw["evaluation"].update(max_loss_rows=4, max_generation_rows=1)
    raw["tracking"]["system_metrics"] = False
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_training_errors_are_retried_only_when_a_retry_can_fix_them(
    prefect_server, tiny_llama_dir, tmp_path, monkeypatch
):
    """training.task_retries 1: an error in the code fails at once with its message (one attempt); a lost process
    is retried, and the retry finishes the run."""
    import tasks.train
    from flows.finetune import finetune
    from qlora.errors import LostProcessError

    calls = []
    real_train_run = tasks.train.train_run

    def broken(*args, **kwargs):
        calls.append("broken")
        raise ValueError("a bug in the training code (test)")

    monkeypatch.setattr(tasks.train, "train_run", broken)
    config = _tiny(tiny_llama_dir, tmp_path, "retries", task_retries=1, max_steps=2)
    with pytest.raises(ValueError, match=r"a bug in the training code \(test\)"):
        finetune(config_path=str(config))
    assert calls == ["broken"]

    def lost_once(*args, **kwargs):
        calls.append("lost")
        if calls.count("lost") == 1:
            raise LostProcessError("rank 1 was killed (test)")
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(tasks.train, "train_run", lost_once)
    summary = finetune(config_path=str(config))
    assert calls == ["broken", "lost", "lost"] and summary["train"]["train_steps"] == 2


@pytest.mark.slow
def test_a_failure_after_training_keeps_the_trained_adapter_and_the_rerun_continues_from_it(
    prefect_server, tiny_llama_dir, tmp_path, monkeypatch
):
    """Registration fails after training (a registry outage): the run folder is not finished, its trained adapter
    is kept, and the re-run evaluates, saves and registers that adapter without training again."""
    from mlflow.tracking import MlflowClient

    import tasks.registry
    from flows.finetune import finetune

    config = _tiny(tiny_llama_dir, tmp_path, "late", max_steps=4)
    real_register = tasks.registry.register_adapter

    def registry_down(*args, **kwargs):
        raise ConnectionError("the model registry is down (test)")

    monkeypatch.setattr(tasks.registry, "register_adapter", registry_down)
    with pytest.raises(ConnectionError):
        finetune(config_path=str(config))
    (run_dir,) = (tmp_path / "out").iterdir()
    assert not (run_dir / "RUN_FINISHED").exists()
    assert (run_dir / "trained-adapter" / "SHA256SUMS.json").is_file() and (run_dir / "train-result.json").is_file()
    trained = json.loads((run_dir / "train-result.json").read_text())

    monkeypatch.setattr(tasks.registry, "register_adapter", real_register)
    summary = finetune(config_path=str(config))
    assert summary["run_dir"] == str(run_dir) and "after training" in summary["run_dir_reason"]
    assert summary["train"] == trained["metrics"]  # what the first attempt measured: nothing trained again
    assert summary["registry"]["version"] == "1" and (run_dir / "RUN_FINISHED").is_file()
    raw = yaml.safe_load(config.read_text())
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    assert not client.get_metric_history(summary["mlflow_run_id"], "loss")  # no training step logged this time
    assert summary["finetuned"]["eval_loss"] < summary["base"]["eval_loss"]


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (root only): room for one checkpoint of the tiny model (3.6 MiB, mostly its tokenizer)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_leaves_no_staging_and_the_run_resumes_once_there_is_room(
    prefect_server, tiny_llama_dir, tmp_path, small_disk
):
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    config = _tiny(tiny_llama_dir, tmp_path, "full", output_dir=str(small_disk / "out"), max_steps=6, save_steps=2)
    env = {"PREFECT_API_URL": PREFECT_API_URL.value()}
    code, err, _ = _cli(["run", "--config", str(config)], env=env, timeout=600)
    assert code == 1, err[-3000:]
    (run_dir,) = (small_disk / "out").iterdir()
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: disk full while writing checkpoint checkpoint-4 in {run_dir} (")
    # what it needs is the size of the newest complete checkpoint (3.6 MiB with the tiny model's float32 adapter)
    from qlora.files import folder_size_bytes

    needed = folder_size_bytes(run_dir / "checkpoint-2") / 2**20
    assert f"it needs about {needed:.1f} MiB): free space there and run again" in line
    assert "Retry" not in err  # a retry would only fill the disk again
    assert not (run_dir / ".checkpoint-staging").exists() and (run_dir / "checkpoint-2" / "SHA256SUMS.json").exists()
    raw = yaml.safe_load(config.read_text())
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    (failed,) = client.search_runs([client.get_experiment_by_name(raw["tracking"]["experiment_name"]).experiment_id])
    assert failed.info.status == "FAILED" and not (run_dir / "RUN_FINISHED").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    code, err, _ = _cli(["run", "--config", str(config)], env=env, timeout=600)
    assert code == 0, err[-3000:]
    assert (run_dir / "RUN_FINISHED").is_file()
    resumed = json.loads((run_dir / "train-result.json").read_text())["resumed_from"]
    assert Path(resumed).name == "checkpoint-2"
