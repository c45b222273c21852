"""Each flow run trains in a folder of its own, `<training.output_dir>/<UTC time>-<flow run name>`.

Runs overlap in production (a schedule and an event trigger, two workers), so nothing a run writes (checkpoints,
adapter, markers) may be read or overwritten by another run. A run folder holds:

    run.lock          an flock held by the live process that owns the folder (its pid and host written inside)
    run.json          who started it: flow run id and name, start time, MLflow run ids, host, pid
    fingerprint.json  what is being trained (written when training starts): resolved config without neutral fields,
                      data digest, base model digest, and the versions of the libraries that change numerics
    checkpoint-N/     complete checkpoints only (qlora/integrations/trainer.py writes them atomically), each with
                      SHA256SUMS.json; one found damaged on resume is set aside as damaged-checkpoint-N
    trained-adapter/  the adapter as training left it, and train-result.json what training measured (written last):
                      a later attempt whose evaluation, saving or registration failed continues from them
    adapter/          the saved adapter (tokenizer, resolved config, checksums)
    RUN_FINISHED      written once every step after training succeeded (registration included): never resumed

Resume (`training.resume: auto`): a new flow run continues the newest unfinished run folder only if no live
process holds it and its fingerprint equals this run's; otherwise it starts fresh in a new folder and says why in
one line. `--resume PATH` continues a given folder (refused, with the reason, if it would mix runs); `--no-resume`
always starts fresh. A Prefect retry of `train-adapter` continues the checkpoints of its own flow run's folder.

The lock is `fcntl.flock` on `run.lock`: taken atomically, released by the kernel when its process dies, so the
lock of a crashed run is stale and is taken over, and a live one never is. On a shared file system flock works
across hosts where the file system supports it (NFS does, through its lock manager).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline_config.schema import PipelineConfig
from qlora.errors import PipelineInputError
from qlora.files import damaged_files, folder_size_bytes, write_text_atomic
from qlora.provenance import NUMERICS_LIBRARIES, library_versions, process_alive, process_identity

LOCK_NAME = "run.lock"
RECORD_NAME = "run.json"
FINGERPRINT_NAME = "fingerprint.json"
FINISHED_MARKER = "RUN_FINISHED"  # written once every step after training succeeded: the folder is never resumed
CHECKPOINT_PREFIX = "checkpoint-"
DAMAGED_PREFIX = "damaged-"
STAGING_DIRNAME = ".checkpoint-staging"
TRAINED_ADAPTER_DIRNAME = "trained-adapter"  # the adapter as training left it (rank 0's, in a distributed run)
TRAIN_RESULT_NAME = "train-result.json"  # what training measured; written after trained-adapter/, so it marks both

# Settings that may differ between an interrupted run and its continuation without changing what is trained:
# where and how often things are logged or kept, retries, and where the data/model files sit (their content is
# in the fingerprint as digests).
NEUTRAL_SECTIONS = ("evaluation", "tracking", "registry")
NEUTRAL_FIELDS = {
    "training.output_dir",
    "training.resume",
    "training.task_retries",
    "training.stop_grace_s",
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.gpu_concurrency_limit",
    "training.gpu_slots",
    "training.gpu_slot_lease_s",
    "training.metrics_on_device",  # when metrics are read, not what is trained
    "training.activation_offloading",  # where saved activations wait, not their values
    "training.compile_layers",  # the same computation, fused (the CPU test checks it against eager)
    "model.name_or_path",
    "model.cache_dir",
    "model.hub_token_env",
    "model.hub_token_secret_block",
    "data.source",
    "data.eval_source",
    "distributed.machine_rank",
    "distributed.main_process_ip",
    "distributed.main_process_port",
    "distributed.rdzv_endpoint",
}


# --- the lock ----------------------------------------------------------------------------------------------------


class RunLock:
    """Exclusive hold on a run folder: `flock` on `run.lock`, with the holder's pid and host written inside."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock without waiting; False if a live process holds it. A dead holder's lock is free."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        holder = json.dumps({**process_identity(), "since": _now_iso()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        os.fsync(fd)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict[str, Any]:
        """The pid/host/since written by the last holder ({} if none)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def is_held_by_other(self) -> bool:
        """True while another live process (or another RunLock in this process) holds it."""
        if self._fd is not None or not self.path.exists():
            return False
        probe = RunLock(self.path.parent)
        if probe.acquire():
            probe.release()
            return False
        return True


def describe_holder(lock: RunLock) -> str:
    h = lock.holder()
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')} since {h.get('since', '?')}"


# --- fingerprint -------------------------------------------------------------------------------------------------


def run_fingerprint(cfg: PipelineConfig, data_digest: str, base_model_digest: str) -> dict[str, Any]:
    """What a run trains: the settings that change the result, the data, the base weights and the numerics."""
    settings = {
        k: v
        for k, v in cfg.to_flat_dict().items()
        if k.split(".")[0] not in NEUTRAL_SECTIONS and k not in NEUTRAL_FIELDS
    }
    return {
        "config": settings,
        "data_digest": data_digest,
        "base_model_digest": base_model_digest,
        "library_versions": library_versions(NUMERICS_LIBRARIES),
    }


def fingerprint_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences, e.g. ["lora.r: 8 -> 16", "data digest"]."""
    changes = []
    old_cfg, new_cfg = before.get("config", {}), now.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            changes.append(f"{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    for key, label in (("data_digest", "data digest"), ("base_model_digest", "base model digest")):
        if before.get(key) != now.get(key):
            changes.append(f"{label} {before.get(key)} -> {now.get(key)}")
    old_v, new_v = before.get("library_versions", {}), now.get("library_versions", {})
    changes += [f"{lib} {old_v.get(lib)} -> {new_v.get(lib)}" for lib in sorted(new_v) if old_v.get(lib) != new_v[lib]]
    return changes


def read_fingerprint(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / FINGERPRINT_NAME).read_text())
    except FileNotFoundError:
        return None


def write_fingerprint(folder: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
    """Called when training starts in a fresh folder: from then on the folder can be resumed by a matching run."""
    write_text_atomic(Path(folder) / FINGERPRINT_NAME, json.dumps(fingerprint, indent=1, sort_keys=True))


# --- run folders -------------------------------------------------------------------------------------------------


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (only complete ones exist: they are renamed into place)."""
    steps = {p: p.name.removeprefix(CHECKPOINT_PREFIX) for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()}
    return sorted((p for p, step in steps.items() if step.isdigit()), key=lambda p: int(steps[p]))


def set_aside_damaged_checkpoints(folder: Path) -> list[str]:
    """Verify the checkpoints newest first against their checksums until an intact one is found; each damaged one
    is renamed `damaged-checkpoint-N` (kept for a look, never resumed from). Returns one line per damaged checkpoint
    naming its first damaged file. Checkpoints written before checksums existed are taken as they are."""
    lines = []
    for ckpt in reversed(checkpoints(folder)):
        damaged = damaged_files(ckpt)
        if not damaged:  # intact, or without checksums
            break
        aside = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        lines.append(
            f"{ckpt.name} is damaged ({damaged[0]}{more}: missing or sha256 mismatch): set aside as {aside.name}"
        )
    return lines


def is_finished(folder: Path) -> bool:
    return (folder / FINISHED_MARKER).exists()


def mark_finished(folder: str | os.PathLike) -> None:
    write_text_atomic(Path(folder) / FINISHED_MARKER, "every step succeeded; this run folder is never resumed\n")


def has_trained_adapter(folder: Path) -> bool:
    return (folder / TRAIN_RESULT_NAME).is_file()


def read_record(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / RECORD_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run_folders(root: str | os.PathLike) -> list[Path]:
    """Run folders under `training.output_dir`, oldest first (folders without a run record are not run folders)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / RECORD_NAME).is_file()]
    return sorted(found, key=lambda p: (read_record(p).get("started_at", ""), p.name))


@dataclass
class RunFolder:
    """The folder a flow run trains in, held by this process until `release()`."""

    path: Path
    resumed: bool  # continues an earlier run's checkpoints
    reason: str  # one line: why this folder (fresh, or what it continues)
    fingerprint: dict[str, Any] = field(repr=False)
    lock: RunLock = field(repr=False)
    continues_mlflow_run_id: str | None = None

    def release(self) -> None:
        if self.lock.held:
            self._end_attempt()
        self.lock.release()

    def record_mlflow_run(self, run_id: str) -> None:
        record = read_record(self.path)
        record["mlflow_run_ids"] = [*record.get("mlflow_run_ids", []), run_id]
        write_text_atomic(self.path / RECORD_NAME, json.dumps(record, indent=1))

    def begin_attempt(self, flow_run: dict[str, Any]) -> None:
        """Record that this process (the flow run `flow_run`: id, name) now works in the folder: if it dies without
        `release()`, a later run finds the attempt and reports its flow run as crashed (`lost_attempts`)."""
        record = read_record(self.path)
        attempt = {**flow_run, **process_identity(), "started_at": _now_iso()}
        record["attempts"] = [*record.get("attempts", []), attempt]
        write_text_atomic(self.path / RECORD_NAME, json.dumps(record, indent=1))

    def _end_attempt(self) -> None:
        me = process_identity()
        record = read_record(self.path)
        for attempt in record.get("attempts", []):
            if attempt.get("pid") == me["pid"] and attempt.get("host") == me["host"] and "ended_at" not in attempt:
                attempt["ended_at"] = _now_iso()
        write_text_atomic(self.path / RECORD_NAME, json.dumps(record, indent=1))


def lost_attempts(root: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, attempt) for every attempt under `root` whose process died without ending it (SIGKILL, a lost
    machine): its flow run was never told. Only attempts of this host can be judged, and only in folders no live
    process holds."""
    lost = []
    for folder in run_folders(root):
        attempts = [a for a in read_record(folder).get("attempts", []) if "ended_at" not in a]
        if not attempts or RunLock(folder).is_held_by_other():
            continue
        lost += [(folder, a) for a in attempts if process_alive(a) is False]
    return lost


def end_lost_attempt(folder: Path, attempt: dict[str, Any], note: str) -> None:
    """Mark a lost attempt as dealt with (so the next run does not report it again)."""
    record = read_record(folder)
    for a in record.get("attempts", []):
        if a.get("pid") == attempt.get("pid") and a.get("started_at") == attempt.get("started_at"):
            a["ended_at"], a["ended"] = _now_iso(), note
    write_text_atomic(folder / RECORD_NAME, json.dumps(record, indent=1))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "run"


def _new_run_folder(root: Path, run_name: str, flow_run: dict[str, Any]) -> tuple[Path, RunLock]:
    """Create `<root>/<UTC time>-<run_name>` already locked: it is built under a hidden name, locked, then renamed,
    so no other process ever sees it unlocked."""
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new-run-", dir=root))
    lock = RunLock(tmp)
    lock.acquire()  # nobody else knows this folder yet
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    record = {**flow_run, "started_at": _now_iso(), **process_identity(), "mlflow_run_ids": []}
    write_text_atomic(tmp / RECORD_NAME, json.dumps(record, indent=1))
    base = f"{stamp}-{_safe_name(run_name)}"
    for attempt in range(100):
        target = root / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            os.rename(tmp, target)  # fails if target exists and is not empty
        except OSError:
            if target.exists():
                continue
            raise
        lock.path = target / LOCK_NAME
        return target, lock
    raise RuntimeError(f"could not name a new run folder under {root}")


def claim_run_folder(
    root: str | Path,
    fingerprint: dict[str, Any],
    run_name: str,
    flow_run: dict[str, Any] | None = None,
    resume: str = "auto",
    resume_dir: str | None = None,
) -> RunFolder:
    """Pick and lock the folder under `root` this flow run trains in (module docstring): `resume` is the run's
    settled `training.resume`. Raises PipelineInputError when an explicit `resume_dir` cannot be continued."""
    root = Path(root)
    flow_run = flow_run or {}
    if resume_dir:
        return _claim_explicit(Path(resume_dir), fingerprint)
    why_fresh = "resume is off (--no-resume or training.resume: never)"
    if resume == "auto":
        unfinished = [p for p in run_folders(root) if not is_finished(p) and read_fingerprint(p) is not None]
        if not unfinished:
            why_fresh = "no unfinished run to resume"
        else:
            candidate = unfinished[-1]
            lock = RunLock(candidate)
            if not lock.acquire():
                holder = describe_holder(lock)
                why_fresh = f"newest unfinished run {candidate.name} is held by a live process ({holder})"
            elif diff := fingerprint_differences(read_fingerprint(candidate), fingerprint):
                lock.release()
                why_fresh = f"newest unfinished run {candidate.name} trained something else ({'; '.join(diff[:3])})"
            else:
                return _resumed(candidate, lock, fingerprint, "same fingerprint, no live holder")
    path, lock = _new_run_folder(root, run_name, flow_run)
    return RunFolder(path, False, f"fresh run folder {path.name}: {why_fresh}", fingerprint, lock)


def _resumed(folder: Path, lock: RunLock, fingerprint: dict[str, Any], why: str) -> RunFolder:
    done = checkpoints(folder)
    if has_trained_adapter(folder):
        what = "after training (it had finished: its trained adapter is evaluated, saved and registered)"
    else:
        what = f"from {done[-1].name}" if done else "(no checkpoint yet: from step 0)"
    previous = read_record(folder).get("mlflow_run_ids") or [None]
    return RunFolder(folder, True, f"resuming {folder.name} {what}: {why}", fingerprint, lock, previous[-1])


def _claim_explicit(folder: Path, fingerprint: dict[str, Any]) -> RunFolder:
    if not (folder / RECORD_NAME).is_file():
        raise PipelineInputError(f"--resume {folder}: not a run folder (no {RECORD_NAME}); see `qlora-flow runs`")
    if is_finished(folder):
        raise PipelineInputError(f"--resume {folder}: that run finished (adapter saved); nothing to resume")
    lock = RunLock(folder)
    if not lock.acquire():
        raise PipelineInputError(
            f"--resume {folder}: held by a live run ({describe_holder(lock)}); wait for it or resume another folder"
        )
    before = read_fingerprint(folder)
    if before is not None and (diff := fingerprint_differences(before, fingerprint)):
        lock.release()
        raise PipelineInputError(
            f"--resume {folder}: its checkpoints are of another run ({'; '.join(diff[:4])}): "
            "run with the settings, data and model it was started with, or without --resume"
        )
    return _resumed(folder, lock, fingerprint, "asked for with --resume")


# --- housekeeping ------------------------------------------------------------------------------------------------


@dataclass
class RunFolderStatus:
    path: Path
    status: str  # finished | unfinished | locked
    size_bytes: int
    checkpoints: int
    started_at: str
    holder: str = ""


def list_run_folders(root: str | os.PathLike) -> list[RunFolderStatus]:
    """Every run folder under `root`, oldest first, with its status and size."""
    out = []
    for folder in run_folders(root):
        lock = RunLock(folder)
        locked = lock.is_held_by_other()
        status = "locked" if locked else "finished" if is_finished(folder) else "unfinished"
        out.append(
            RunFolderStatus(
                folder,
                status,
                folder_size_bytes(folder),
                len(checkpoints(folder)),
                read_record(folder).get("started_at", "?"),
                describe_holder(lock) if locked else "",
            )
        )
    return out


@dataclass
class GcResult:
    removed: list[Path]
    freed_bytes: int
    kept: list[Path]


def remove_old_checkpoints(root: str | os.PathLike, keep: int, dry_run: bool = False) -> GcResult:
    """Remove the checkpoints of finished runs except the `keep` newest finished ones. Unfinished and locked run
    folders are never touched (each folder is locked while its checkpoints are removed); adapters stay."""
    if keep < 0:
        raise PipelineInputError("gc --keep must be 0 or more")
    finished = [p for p in run_folders(root) if is_finished(p)]
    kept = finished[len(finished) - keep :] if keep else []
    removed, freed = [], 0
    for folder in finished[: len(finished) - keep] if keep else finished:
        lock = RunLock(folder)
        if not lock.acquire():
            continue
        try:
            damaged = sorted(folder.glob(f"{DAMAGED_PREFIX}{CHECKPOINT_PREFIX}*"))
            for ckpt in [*checkpoints(folder), *damaged, folder / STAGING_DIRNAME]:
                if not ckpt.exists():
                    continue
                freed += folder_size_bytes(ckpt)
                removed.append(ckpt)
                if not dry_run:
                    shutil.rmtree(ckpt)
        finally:
            lock.release()
    return GcResult(removed, freed, kept)
