"""Errors the CLI reports in one line (add --debug for the traceback), and which failures a retry can fix.

- `PipelineInputError`: fix your input (config, data, model location, a service address); exit code 2. Found
  before any weights load wherever it can be.
- `RunEnvironmentError`: the machine cannot go on with the run (the disk is full); exit code 1. The run folder stays
  resumable: the re-run, once that is fixed, continues from the newest complete checkpoint.
- Anything else is a failure with a traceback. `is_transient` tells which failures a retry can fix.
"""

from __future__ import annotations

import errno
import os
import shutil


class PipelineInputError(ValueError):
    """Bad input (data, model location, environment) found before or while loading; the message says what to do."""


class DataError(PipelineInputError):
    """The dataset cannot be read or does not have the expected shape."""


class ModelSourceError(PipelineInputError):
    """The base model cannot be found or fetched."""


class RunEnvironmentError(RuntimeError):
    """The machine cannot continue the run (disk full); the message names the folder and what is needed."""


class Refused(RuntimeError):
    """The command's answer is no, for a reason its message gives (a merge that changes the model, a sweep with no
    completed trial): one line and exit code 1, not a crash with a traceback."""


class LostProcessError(RuntimeError):
    """A training process died from outside (killed, lost node): a retry on a healthy machine can succeed."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# Below this much free space a failed write is taken for a full disk (torch.save reports one as a RuntimeError,
# "unexpected pos", not as ENOSPC).
NEARLY_FULL_BYTES = 32 << 20


def disk_full_error(exc: BaseException, folder: str | os.PathLike, what: str, needed_bytes: int | None):
    """A RunEnvironmentError for `exc` if it was a full disk while writing `what` into `folder`, else None. Call it
    before removing what the failed write left (its free space is what tells a full disk)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or free < NEARLY_FULL_BYTES
    if not full:
        return None
    need = f"about {_size(needed_bytes)}" if needed_bytes else "more space"
    return RunEnvironmentError(
        f"disk full while writing {what} in {folder} ({_size(free)} free; it needs {need}): free space there and run "
        "again; the run folder is kept and resumes from its newest complete checkpoint"
    )


def is_transient(exc: BaseException) -> bool:
    """Can a retry of the same step fix this failure? Yes for a lost process or node and for a service outage
    (connections refused, reset or timed out); no for bad input, a full disk, or an error in the code or the data,
    which would fail again the same way."""
    if isinstance(exc, PipelineInputError | RunEnvironmentError):
        return False
    if isinstance(exc, LostProcessError | ConnectionError | TimeoutError):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    # requests / httpx / urllib3 connection failures, without importing them here
    if names & {"ConnectionError", "ConnectTimeout", "ReadTimeout", "RemoteDisconnected", "ProtocolError"}:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)
