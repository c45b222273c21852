"""The Prefect steps the flow wires (flows/finetune.py): thin `@task` wrappers over plain functions in `qlora/`.

Each module here adds only what Prefect needs: the step's name, retries and timeouts, cache policy, and the run
log. The work itself, and everything tests call directly, is in `qlora/`.
"""

from tasks import secrets as _secrets  # noqa: F401  (lets qlora read hub tokens from Prefect Secret blocks)
