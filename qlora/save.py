"""Save the adapter (safetensors) with the tokenizer and the resolved config, atomically.

Everything is written into a temporary sibling folder first and renamed into place, so a crash or a full disk
never leaves a half-written adapter where a reader (or the registry) would pick it up.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline_config.loading import dump_pipeline_config
from pipeline_config.schema import PipelineConfig
from qlora.errors import PipelineInputError
from qlora.files import CHECKSUMS_NAME, atomic_folder, damaged_files, write_checksums
from qlora.model_source import file_digest

ADAPTER_DIRNAME = "adapter"
RESOLVED_CONFIG_NAME = "pipeline_config.yaml"


def adapter_checksum(folder: Path) -> str:
    """One digest for the whole adapter folder: the sha256 of its checksum file."""
    return file_digest(folder / CHECKSUMS_NAME)


def verify_adapter_dir(folder: Path, expected_checksum: str | None = None) -> None:
    """Raise PipelineInputError unless every file matches SHA256SUMS.json (and that file the expected digest)."""
    if not (folder / CHECKSUMS_NAME).is_file():
        raise PipelineInputError(f"{folder}: no {CHECKSUMS_NAME}; not a complete adapter folder")
    if expected_checksum and adapter_checksum(folder) != expected_checksum:
        raise PipelineInputError(f"{folder}: checksum file differs from the one logged with the run")
    if damaged := damaged_files(folder):
        raise PipelineInputError(f"{folder}/{damaged[0]}: missing or corrupted (sha256 mismatch); download it again")


def save_adapter(peft_model, tokenizer, cfg: PipelineConfig, run_dir: str | os.PathLike | None = None) -> Path:
    """Write adapter weights, tokenizer and resolved config to `<run folder>/adapter` (default: `<output_dir>`);
    returns the adapter folder. (The run folder is marked finished by the flow once every later step succeeded.)
    Raises RunEnvironmentError when the disk is full (nothing half-written is left)."""
    out_dir = Path(run_dir or cfg.training.output_dir)
    final = out_dir / ADAPTER_DIRNAME
    with atomic_folder(final, replace=True, what="the adapter", needed_bytes=_trained_adapter_bytes(out_dir)) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])  # not a stage's "ref"
        tokenizer.save_pretrained(tmp)
        (tmp / RESOLVED_CONFIG_NAME).write_text(dump_pipeline_config(cfg))
        write_checksums(tmp)
    return final


def _trained_adapter_bytes(run_dir: Path) -> int | None:
    from qlora.files import folder_size_bytes
    from qlora.run_folder import TRAINED_ADAPTER_DIRNAME

    folder = run_dir / TRAINED_ADAPTER_DIRNAME
    return folder_size_bytes(folder) if folder.is_dir() else None
