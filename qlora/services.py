"""Are the services a run needs there? One quick probe each (seconds), made before anything starts.

A tracking server or Prefect API that is down or mistyped would otherwise cost minutes of the clients' retries and
several tracebacks (MLflow retries an HTTP call for ~4 minutes); an outage that begins mid-run is still ridden out
by those retries. A probe only asks whether something answers at the address: any HTTP answer counts, even a 401 or
404 (authentication and paths are the clients' business).
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 5.0
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQL_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def tracking_uri_or_default(explicit: str | None) -> str:
    """`explicit`, else $MLFLOW_TRACKING_URI, else a SQLite store in the working folder."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def resolve_tracking_uri(cfg) -> str:
    """The tracking store of a run (`TrackingConfig`): config value, else $MLFLOW_TRACKING_URI, else a SQLite store
    in the working folder. (Here, not in qlora/tracking.py: the CLI probes it before importing MLflow.)"""
    return tracking_uri_or_default(cfg.tracking_uri)


def _http_problem(url: str, timeout_s: float) -> str | None:
    try:
        # No proxy: a local server must not be asked through $HTTP_PROXY; a remote one answers directly too.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason.strerror if isinstance(reason, OSError) and reason.strerror else reason)


def _tcp_problem(host: str, port: int, timeout_s: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def tracking_store_problem(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the MLflow tracking store at `uri` cannot be used right now, in one line; None if it can."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        if why := _http_problem(uri.rstrip("/") + "/health", timeout_s):
            return (
                f"the MLflow tracking server {uri} does not answer ({why}): start it, or point tracking.tracking_uri "
                "(or $MLFLOW_TRACKING_URI) at a running one"
            )
        return None
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        folder = Path(path).parent if path not in ("", ":memory:") else Path(".")
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            return f"the MLflow store {uri}: folder {folder} cannot be created or written: choose another path"
        return None
    if scheme in SQL_DEFAULT_PORTS and parsed.hostname:
        port = parsed.port or SQL_DEFAULT_PORTS[scheme]
        if why := _tcp_problem(parsed.hostname, port, timeout_s):
            return f"the MLflow database {parsed.hostname}:{port} does not answer ({why}): start it or fix the URI"
    return None


def prefect_api_problem(api_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Prefect API at `api_url` cannot be used right now, in one line; None if it answers."""
    if why := _http_problem(api_url.rstrip("/") + "/health", timeout_s):
        return (
            f"the Prefect API {api_url} (PREFECT_API_URL) does not answer ({why}): start the server (`make server`), "
            "or unset PREFECT_API_URL to let the run start a temporary one"
        )
    return None
