"""Save the adapter (safetensors) with the tokenizer and the resolved config, atomically.

Everything is written into a temporary sibling folder first and renamed into place, so a crash or a full disk
never leaves a half-written adapter where a reader (or the registry) would pick it up.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from pipeline_config.schema import PipelineConfig, dump_pipeline_config
from qlora.errors import PipelineInputError
from qlora.files import atomic_folder
from qlora.model_source import file_digest
from qlora.run_folder import mark_finished

ADAPTER_DIRNAME = "adapter"
RESOLVED_CONFIG_NAME = "pipeline_config.yaml"
CHECKSUMS_NAME = "SHA256SUMS.json"


def write_checksums(folder: Path) -> None:
    sums = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_NAME}
    (folder / CHECKSUMS_NAME).write_text(json.dumps(sums, indent=1))


def adapter_checksum(folder: Path) -> str:
    """One digest for the whole adapter folder: the sha256 of its checksum file."""
    return file_digest(folder / CHECKSUMS_NAME)


def verify_adapter_dir(folder: Path, expected_checksum: str | None = None) -> None:
    """Raise PipelineInputError unless every file matches SHA256SUMS.json (and that file the expected digest)."""
    sums_path = folder / CHECKSUMS_NAME
    if not sums_path.is_file():
        raise PipelineInputError(f"{folder}: no {CHECKSUMS_NAME}; not a complete adapter folder")
    if expected_checksum and adapter_checksum(folder) != expected_checksum:
        raise PipelineInputError(f"{folder}: checksum file differs from the one logged with the run")
    for name, digest in json.loads(sums_path.read_text()).items():
        if not (folder / name).is_file() or file_digest(folder / name) != digest:
            raise PipelineInputError(f"{folder}/{name}: missing or corrupted (sha256 mismatch); download it again")


def save_adapter(peft_model, tokenizer, cfg: PipelineConfig, run_dir: str | os.PathLike | None = None) -> Path:
    """Write adapter weights, tokenizer and resolved config to `<run folder>/adapter` (default: `<output_dir>`),
    then mark the run folder finished; returns the adapter folder."""
    out_dir = Path(run_dir or cfg.training.output_dir)
    final = out_dir / ADAPTER_DIRNAME
    try:
        with atomic_folder(final, replace=True) as tmp:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / RESOLVED_CONFIG_NAME).write_text(dump_pipeline_config(cfg))
            write_checksums(tmp)
        mark_finished(out_dir)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PipelineInputError(
                f"disk full while saving the adapter to {final}: free space and re-run "
                "(complete checkpoints are kept, so the re-run resumes)"
            ) from None
        raise
    return final
