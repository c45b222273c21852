"""Hub tokens from Prefect Secret blocks (`model.hub_token_secret_block`), for qlora/model_source.py."""

from __future__ import annotations

from qlora import model_source
from qlora.errors import ModelSourceError


def read_secret_block(name: str) -> str | None:
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name).get()
    except (ValueError, RuntimeError) as exc:
        raise ModelSourceError(
            f"model.hub_token_secret_block {name!r} unreadable ({type(exc).__name__}): create it with "
            "`prefect block create secret` or set the environment variable instead"
        ) from None


model_source.secret_block_reader = read_secret_block
