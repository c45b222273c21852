"""The temporary Prefect server a `qlora-flow run` / `sweep` starts when no PREFECT_API_URL is set: Prefect's own
ephemeral server, started so that it

- dies with the run (Linux's parent-death signal, qlora/processes.py), whatever killed the run, SIGKILL included;
  Prefect's own start leaves it running, listening, with no parent;
- is out of reach of the terminal's Ctrl-C (a session of its own): the run stops gracefully and then stops it,
  where before the same Ctrl-C killed the server under the still-running flow and its client retried for minutes;
- gets the time a loaded machine needs to start (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, default here
  90 s instead of 20), and a failure to start says what to do.

Written for Prefect 3.9. Private names used (tests/test_integrations.py checks them): `SubprocessASGIServer`
(its singleton `_instances`, keyed by port, None for the ephemeral one that `get_client()` starts) and its
`_run_uvicorn_command`, whose command line this class repeats with the two Popen options added.
"""

from __future__ import annotations

import os
import subprocess
import sys

from qlora.errors import PipelineInputError
from qlora.processes import die_with_parent

WRITTEN_FOR = {"prefect": "3.9.1"}
STARTUP_TIMEOUT_S = 90


def _server_class():
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class DyingWithRunServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                args=[
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(prefect.__module_path__.parent),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env={
                    **os.environ,
                    **server_env,
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    return DyingWithRunServer


def start_temporary_server():
    """Start the ephemeral server (if the run needs one) before Prefect would, as the instance Prefect's clients
    then use. Returns it (None when PREFECT_API_URL names a server). Raises PipelineInputError if it does not start
    in time."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():
        return None
    timeout_s = STARTUP_TIMEOUT_S
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        timeout_s = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    existing = SubprocessASGIServer._instances.get(None)
    if existing is not None and existing.running:
        return existing
    server = _server_class()()  # registers itself as the ephemeral instance (port None) Prefect's clients use
    try:
        server.start(timeout=timeout_s)
    except RuntimeError as exc:
        raise PipelineInputError(
            f"the temporary Prefect server did not start within {timeout_s} s ({str(exc).splitlines()[0]}): on a "
            "busy machine start one with `make server` and set PREFECT_API_URL=http://127.0.0.1:4200/api, or allow "
            "more time with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        ) from None
    return server
