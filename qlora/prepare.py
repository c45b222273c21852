"""Load + format the dataset as the flow runs it: cached across flow runs (step `prepare-dataset`).

Cache key (Prefect `cache_key_fn`): the source data's content digest, the tokenizer (name and vocabulary digest),
its chat template, the formatting settings (`data` section and `training.max_seq_length`) and the source code of
the loading/formatting functions; a change to any of them is a cache miss. The prepared splits are saved as Arrow
files under `.cache/datasets/<key>/`; the cached Prefect result is only a small reference to that folder
(`PreparedDataset`), opened by `open-prepared-dataset`, which rebuilds the folder if it was deleted. Because the rows
are file-backed, the tokenization SFTTrainer runs on them is itself cached by `datasets` (its fingerprint covers
the rows, the tokenizer and TRL's tokenize function). Models are never cached or persisted.

The record holds the cache key, not a path: a run in another working folder (another checkout, a worker) finds or
builds the folder under its own `.cache/datasets/`. The folder carries checksums of its Arrow files; a copy found
missing, damaged (a truncated file) or unchecked is rebuilt and the run log says so, never a dead end.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import datasets

from pipeline_config.schema import DataConfig, TrainingConfig
from qlora import bundled_data
from qlora import data as data_module
from qlora.data import BUNDLED_PREFIX, DatasetSplits, load_dataset_splits
from qlora.files import atomic_folder, damaged_files, write_checksums
from qlora.model_source import file_digest

CACHE_DIR = Path(".cache/datasets")
# Functions whose source decides what the prepared rows look like.
SOURCE_FUNCTIONS = ("load_dataset_splits", "_read_source", "format_rows", "detect_format", "digest_rows")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_content_digest(cfg: DataConfig) -> str:
    """Digest of the raw data without parsing it: file bytes, bundled generator settings, or hub id."""
    parts = []
    for source in filter(None, (cfg.source, cfg.eval_source)):
        path = Path(source)
        if source.startswith(BUNDLED_PREFIX):
            parts.append(f"{source}|{cfg.bundled_train_rows}|{cfg.bundled_eval_rows}|{cfg.seed}")
            parts.append(inspect.getsource(bundled_data))
        elif path.is_file():
            parts.append(file_digest(path))
        else:  # hub dataset: its id (a revision pin would go here); retries fetch the same files
            parts.append(f"hub:{source}")
    return _sha("\n".join(parts))


def task_source_digest() -> str:
    return _sha("\n".join(inspect.getsource(getattr(data_module, name)) for name in SOURCE_FUNCTIONS))


def tokenizer_digest(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(
        f"{tokenizer.name_or_path}|{type(tokenizer).__name__}|{vocab}|{tokenizer.eos_token}|{tokenizer.pad_token}"
    )


def dataset_cache_key(context, parameters: dict) -> str:
    cfg: DataConfig = parameters["cfg"]
    tokenizer = parameters["tokenizer"]
    train_cfg: TrainingConfig = parameters["train_cfg"]
    parts = {
        "data": source_content_digest(cfg),
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": tokenizer.chat_template or "",
        "formatting": json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + f"|{train_cfg.max_seq_length}",
        "task_source": task_source_digest(),
        "record": 2,  # the cached record's shape (2: a cache key, no absolute folder path)
    }
    return "prepared-dataset-" + _sha(json.dumps(parts, sort_keys=True))[:32]


@dataclass
class PreparedDataset:
    """What the cache stores: the prepared splits' cache key and their metadata (no rows, no models, and no path:
    the folder is `.cache/datasets/<key>` below the working folder of whichever run opens it)."""

    key: str
    kind: str
    digest: str
    source: str
    response_template: str | None

    @property
    def folder(self) -> Path:
        return CACHE_DIR.resolve() / self.key


def prepare_dataset(cfg: DataConfig, cache_key: str, rebuild: bool = False) -> PreparedDataset:
    """Load + format, then save both splits as Arrow under the cache folder, with checksums (atomically). An
    existing intact folder is reused; `rebuild` replaces it (it was found damaged)."""
    from filelock import FileLock

    splits = load_dataset_splits(cfg)
    ref = PreparedDataset(cache_key, splits.kind, splits.digest, splits.source, splits.response_template)
    target = ref.folder
    target.parent.mkdir(parents=True, exist_ok=True)
    # Runs that start together prepare the same key at once: one builds, the others wait and reuse its folder. An
    # OS file lock, so a crashed builder never blocks; the folder itself still appears only complete (rename).
    with FileLock(str(target) + ".lock"):
        if rebuild or damaged_files(target) != []:
            # a reader of the damaged copy keeps its open files; the new one is swapped in whole
            with atomic_folder(target, replace=True) as tmp:
                splits.train.save_to_disk(str(tmp / "train"))
                splits.eval.save_to_disk(str(tmp / "eval"))
                write_checksums(tmp)
    return ref


def prepared_problem(ref: PreparedDataset) -> str | None:
    """Why the prepared folder cannot be used as it is (missing, damaged, written without checksums), or None."""
    folder = ref.folder
    if not folder.is_dir():
        return f"{folder} is missing"
    damaged = damaged_files(folder)
    if damaged is None:
        return f"{folder} has no checksums (written by an older version)"
    if damaged:
        return f"{folder}/{damaged[0]} is damaged (missing or sha256 mismatch)"
    return None


def open_prepared(ref: PreparedDataset, cfg: DataConfig, log=None) -> DatasetSplits:
    """The prepared splits, memory-mapped from the cache folder, verified against their checksums first: a folder
    found missing or damaged is rebuilt from the source data, and `log` says so. Never a dead end."""
    if problem := prepared_problem(ref):
        if log is not None:
            log.warning("prepared dataset %s: rebuilding it from %s", problem, ref.source)
        ref = prepare_dataset(cfg, ref.key, rebuild=True)
    folder = ref.folder
    return DatasetSplits(
        train=datasets.load_from_disk(str(folder / "train")),
        eval=datasets.load_from_disk(str(folder / "eval")),
        kind=ref.kind,
        digest=ref.digest,
        source=ref.source,
        response_template=ref.response_template,
    )
