"""Where a run came from and who is running it: git commit, library versions, and this process's identity.

One module for these facts, so MLflow tags, registry version tags, run-folder fingerprints and lock holders all
read them the same way.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

# Recorded with every run and registered version.
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "prefect", "mlflow")
# The ones whose version changes the numbers training produces (part of a run folder's fingerprint).
NUMERICS_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate")


def git_commit(repo_dir: Path | None = None) -> str:
    here = repo_dir or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def process_identity() -> dict[str, Any]:
    """This process as other processes can check it: pid, host and the pid's start time (guards pid reuse)."""
    import psutil

    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": psutil.Process().create_time()}


def process_alive(identity: dict[str, Any]) -> bool | None:
    """True/False for a process on this host; None when it ran on another host (cannot be checked from here)."""
    import psutil

    if identity.get("host") != socket.gethostname():
        return None
    try:
        proc = psutil.Process(int(identity["pid"]))
        start = identity.get("start_time")
        return start is None or abs(proc.create_time() - float(start)) < 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False
