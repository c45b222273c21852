"""File-system helpers: atomic writes of files and folders, and folder sizes.

Everything a run publishes (prepared datasets, converted models, adapters, run records) is written under a
temporary sibling name and renamed into place, so a reader, another run, or a crash never sees half of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old content or the new one, never a part of it."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folder_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of the regular files under `path` (files that vanish while counting are skipped)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


@contextlib.contextmanager
def atomic_folder(
    target: str | os.PathLike, replace: bool = False, what: str | None = None, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target` to build in; when the block succeeds it is renamed to `target`.

    If `target` exists by then: `replace=False` keeps it (another process published the same content first; the new
    copy is dropped), `replace=True` swaps the new one in. On any error the temporary folder is removed. With `what`
    (e.g. "the adapter"), a failure that is a full disk becomes one RunEnvironmentError naming the folder and the
    space needed (`needed_bytes`), judged before the partial copy is removed."""
    from qlora.errors import disk_full_error

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else's complete copy is already in place
        fsync_dir(target.parent)
    except BaseException as exc:
        full = disk_full_error(exc, target.parent, what, needed_bytes) if what and isinstance(exc, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise


def check_output_target(
    path: str | os.PathLike,
    option: str,
    is_folder: bool,
    overwrite: bool = False,
    written_by_us: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse an output path that would delete or overwrite something the command did not write, before any work.

    A new path, or an empty folder, is taken. An existing file or non-empty folder is replaced only with `overwrite`
    and only when `written_by_us(path)` says the command wrote it earlier (compare's report folder, generate's
    answers file). A path of the wrong kind (a file where a folder goes, or the reverse) or under a file is refused.
    Raises PipelineInputError naming `option`."""
    from qlora.errors import PipelineInputError

    target = Path(path)
    kind = "folder" if is_folder else "file"
    if target.exists():
        if target.is_dir() != is_folder:
            raise PipelineInputError(f"{option} {target} is a {'file' if is_folder else 'folder'}: give a {kind} path")
        if is_folder and not any(target.iterdir()):
            return
        if not overwrite:
            raise PipelineInputError(
                f"{option} {target} exists{' and is not empty' if is_folder else ''}: choose a new {kind}, or add "
                "--overwrite to replace what this command wrote there earlier (nothing else is ever replaced)"
            )
        if written_by_us is None or not written_by_us(target):
            raise PipelineInputError(
                f"{option} {target} holds files this command did not write: it is never replaced; choose a new {kind}"
            )
        return
    ancestor = next((p for p in target.absolute().parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise PipelineInputError(f"{option} {target}: {ancestor} is a file, so nothing can be created under it")
    if ancestor is not None and not os.access(ancestor, os.W_OK):
        raise PipelineInputError(f"{option} {target}: {ancestor} is not writable: choose another place")


# --- checksums -----------------------------------------------------------------------------------------------------

CHECKSUMS_NAME = "SHA256SUMS.json"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: str | os.PathLike) -> None:
    """`SHA256SUMS.json` in `folder`: the sha256 of every file below it (relative paths), fsynced. Written last into
    a folder that is about to be renamed into place, so a complete folder always carries its checksums."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_NAME)
    sums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}
    with open(folder / CHECKSUMS_NAME, "w") as fh:
        fh.write(json.dumps(sums, indent=1))
        fh.flush()
        os.fsync(fh.fileno())


def damaged_files(folder: str | os.PathLike) -> list[str] | None:
    """Files of `folder` that are missing or differ from its `SHA256SUMS.json` ([] = intact); None when the folder
    has no checksum file (written before checksums existed: cannot be verified)."""
    folder = Path(folder)
    try:
        sums = json.loads((folder / CHECKSUMS_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return [CHECKSUMS_NAME]
    damaged = []
    for name, digest in sums.items():
        path = folder / name
        try:
            if sha256_file(path) != digest:
                damaged.append(name)
        except OSError:
            damaged.append(name)
    return damaged
