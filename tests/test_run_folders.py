"""Run folders, their locks and housekeeping, and the other places where a second process could break a run:
the prepared-dataset cache and the closer of interrupted MLflow runs. Processes here are real (subprocesses that
hold a lock, get SIGKILLed, or prepare the same dataset at the same moment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from pipeline_config.schema import PipelineConfig
from qlora.run_folder import (
    FINISHED_MARKER,
    STAGING_DIRNAME,
    RunLock,
    claim_run_folder,
    list_run_folders,
    remove_old_checkpoints,
    write_fingerprint,
)
from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parent.parent

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from qlora.run_folder import RunLock
    lock = RunLock(sys.argv[1])
    assert lock.acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


def _lock_holder(folder: Path) -> subprocess.Popen:
    """A separate process that takes the folder's lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_lock_is_never_taken_and_a_dead_holders_lock_is(tmp_path):
    holder = _lock_holder(tmp_path)
    try:
        lock = RunLock(tmp_path)
        assert not lock.acquire()
        assert lock.holder()["pid"] == holder.pid
        assert lock.is_held_by_other()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    lock = RunLock(tmp_path)
    assert not lock.is_held_by_other()
    assert lock.acquire()  # the kernel released the dead holder's flock: the stale lock is taken over
    assert lock.holder()["pid"] == os.getpid()
    assert not RunLock(tmp_path).acquire()  # and a second holder, even in this process, is refused
    lock.release()


def _fingerprint(**changes) -> dict:
    fp = {"config": {"lora.r": 8}, "data_digest": "d1", "base_model_digest": "m1", "library_versions": {"torch": "1"}}
    return {**fp, **changes}


@pytest.fixture
def cfg(tiny_llama_dir, tmp_path) -> PipelineConfig:
    return PipelineConfig.model_validate(tiny_config_dict(tiny_llama_dir, tmp_path))


def _unfinished_run(cfg, fingerprint, name="first") -> Path:
    folder = claim_run_folder(cfg.training.output_dir, fingerprint, name)
    write_fingerprint(folder.path, fingerprint)
    (folder.path / "checkpoint-2").mkdir()
    folder.release()
    return folder.path


def test_claim_resumes_only_a_matching_unlocked_unfinished_run(cfg):
    first = _unfinished_run(cfg, _fingerprint())

    other = claim_run_folder(cfg.training.output_dir, _fingerprint(data_digest="d2"), "other-data")
    assert other.path != first and not other.resumed
    assert "trained something else" in other.reason and "data digest d1 -> d2" in other.reason
    other.release()  # `other` never trained: no fingerprint, so it is no candidate for resuming

    again = claim_run_folder(cfg.training.output_dir, _fingerprint(), "again")
    assert again.path == first and again.resumed and "from checkpoint-2" in again.reason
    while_held = claim_run_folder(cfg.training.output_dir, _fingerprint(), "while-held")  # `again` still holds the lock
    assert while_held.path not in (first, other.path) and "held by a live process" in while_held.reason
    assert f"pid {os.getpid()}" in while_held.reason
    again.release()
    while_held.release()

    never = claim_run_folder(cfg.training.output_dir, _fingerprint(), "never", resume="never")
    assert not never.resumed and "resume is off" in never.reason
    never.release()


def test_finished_runs_are_never_resumed(cfg):
    first = _unfinished_run(cfg, _fingerprint())
    (first / FINISHED_MARKER).write_text("")
    fresh = claim_run_folder(cfg.training.output_dir, _fingerprint(), "after-finish")
    assert fresh.path != first and not fresh.resumed and "no unfinished run" in fresh.reason
    fresh.release()


def test_explicit_resume_is_refused_when_it_would_mix_runs(cfg, tmp_path):
    from qlora.errors import PipelineInputError

    first = _unfinished_run(cfg, _fingerprint())
    with pytest.raises(PipelineInputError, match=r"lora.r: 8 -> 16"):
        claim_run_folder(cfg.training.output_dir, _fingerprint(config={"lora.r": 16}), "x", resume_dir=str(first))
    holder = _lock_holder(first)
    try:
        with pytest.raises(PipelineInputError, match=f"held by a live run.*pid {holder.pid}"):
            claim_run_folder(cfg.training.output_dir, _fingerprint(), "x", resume_dir=str(first))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with pytest.raises(PipelineInputError, match="not a run folder"):
        claim_run_folder(cfg.training.output_dir, _fingerprint(), "x", resume_dir=str(tmp_path))
    resumed = claim_run_folder(cfg.training.output_dir, _fingerprint(), "x", resume_dir=str(first))
    assert resumed.resumed and resumed.path == first
    resumed.release()


def test_runs_lists_status_and_gc_spares_unfinished_and_locked(cfg, capsys):
    root = Path(cfg.training.output_dir)
    folders = []
    for i in range(4):
        folder = _unfinished_run(cfg, _fingerprint(data_digest=f"d{i}"), f"r{i}")
        (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 1000)
        (folder / STAGING_DIRNAME).mkdir()
        folders.append(folder)
    for folder in folders[:3]:
        (folder / FINISHED_MARKER).write_text("")
    holder = _lock_holder(folders[0])  # finished but locked: gc must leave it alone
    try:
        statuses = {s.path: s.status for s in list_run_folders(root)}
        assert statuses == dict(zip(folders, ["locked", "finished", "finished", "unfinished"], strict=True))
        assert main(["runs", "--output-dir", str(root)]) == 0
        out = capsys.readouterr().out
        assert folders[3].name in out and "unfinished" in out and f"held by pid {holder.pid}" in out

        dry = remove_old_checkpoints(root, keep=1, dry_run=True)
        assert (folders[1] / "checkpoint-2") in dry.removed and (folders[1] / "checkpoint-2").is_dir()
        assert main(["gc", "--output-dir", str(root), "--keep", "1"]) == 0
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not (folders[1] / "checkpoint-2").exists() and not (folders[1] / STAGING_DIRNAME).exists()
    assert (folders[0] / "checkpoint-2").is_dir()  # locked
    assert (folders[2] / "checkpoint-2").is_dir()  # the newest finished run, kept
    assert (folders[3] / "checkpoint-2").is_dir()  # unfinished
    assert "removed 2 checkpoint folder(s)" in capsys.readouterr().out


def test_killed_closer_leaves_a_live_writer_alone(tmp_path):
    """Two RUNNING runs: one written by a live process, one whose process died. Only the dead one is closed."""
    from qlora.tracking import close_interrupted_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("closer", artifact_location=str(tmp_path / "art"))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    try:
        import psutil

        runs = {}
        for name, proc in (("live", live), ("dead", dead)):
            start = psutil.Process(live.pid).create_time() if proc is live else 0.0
            tags = {"process.pid": str(proc.pid), "process.host": os.uname().nodename, "process.start_time": str(start)}
            runs[name] = client.create_run(exp, tags=tags).info.run_id
        runs["other-host"] = client.create_run(
            exp, tags={"process.pid": "1", "process.host": "elsewhere", "process.start_time": "0"}
        ).info.run_id
        mlflow.set_tracking_uri(uri)
        closed = close_interrupted_runs(exp)
        assert closed == [runs["dead"]]
        assert client.get_run(runs["dead"]).info.status == "KILLED"
        assert client.get_run(runs["live"]).info.status == "RUNNING"
        assert client.get_run(runs["other-host"]).info.status == "RUNNING"
    finally:
        live.kill()
        live.wait(timeout=30)


PREPARE = textwrap.dedent(
    """
    import json, os, pathlib, sys, time
    from pipeline_config.loading import load_pipeline_config
    from qlora.prepare import prepare_dataset
    cfg = load_pipeline_config(sys.argv[1])
    barrier = pathlib.Path(sys.argv[2])
    (barrier / str(os.getpid())).touch()
    while len(list(barrier.iterdir())) < 2:  # both imported and ready: start together
        time.sleep(0.001)
    ref = prepare_dataset(cfg.data, "prepared-dataset-race")
    print(json.dumps({"folder": str(ref.folder), "digest": ref.digest}))
    """
)


def test_two_processes_preparing_the_same_key_leave_one_valid_entry(tiny_config_file, tmp_path):
    import datasets

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(tiny_config_file), str(barrier)],
            cwd=tmp_path,  # the cache is relative to the working folder
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    refs = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert refs[0] == refs[1]
    cache = tmp_path / ".cache" / "datasets"
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert [p.name for p in entries] == ["prepared-dataset-race"]  # no temp folder left behind
    train = datasets.load_from_disk(str(entries[0] / "train"))
    assert len(train) == 64 and "messages" in train.column_names
