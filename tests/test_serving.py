"""Serving the registered model over REST: `mlflow models serve` answers the request forms the pyfunc accepts (a
bare string, a list of prompts, a chat) with the same greedy answers as the model loaded in-process, and turns a
bad input away with a 4xx and a message, not a stack trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import pandas as pd
import pytest

from tests.conftest import free_port, train_tiny_champion, wait_for_http

pytestmark = pytest.mark.slow
MODEL_NAME = "tiny-serve"
MODEL_URI = f"models:/{MODEL_NAME}@champion"


def _post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def registered_tiny_model(prefect_server, tiny_llama_dir, tmp_path) -> str:
    """Runs the real flow (2 steps) and returns the tracking URI of the store holding `tiny-serve@champion`."""
    _, raw = train_tiny_champion(tiny_llama_dir, tmp_path, MODEL_NAME, max_steps=2)
    return raw["tracking"]["tracking_uri"]


@pytest.fixture
def served_model(registered_tiny_model, tmp_path) -> str:
    """`mlflow models serve` on the champion, in its own process group; yields the /invocations URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["MLFLOW_TRACKING_URI"] = registered_tiny_model
    # The server is started as `uvicorn ...` through bash: the venv's bin must be on PATH even when it is not active.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI, "--env-manager", "local"]
        + ["--host", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_for_http(url + "/ping", proc, timeout_s=180):  # the model is loaded before /ping answers
            pytest.fail("mlflow models serve did not come up:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        yield url + "/invocations"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the uvicorn worker it starts
        except ProcessLookupError:  # the whole group has already exited
            pass
        proc.wait(timeout=30)
        log.close()


def test_served_champion_answers_a_bare_string_like_the_in_process_model(registered_tiny_model, served_model):
    mlflow.set_tracking_uri(registered_tiny_model)
    signature = mlflow.models.get_model_info(MODEL_URI).signature
    assert signature is not None
    assert signature.inputs.to_dict() == [{"type": "any", "required": True}]
    assert signature.outputs.to_dict() == [{"type": "string", "required": True}]

    model = mlflow.pyfunc.load_model(MODEL_URI)
    bare = model.predict(["a bare string"])
    pair = model.predict(["a bare string", "Order from Mei Tanaka: three travel mugs."])
    assert len(bare) == 1 and isinstance(bare[0], str) and len(pair) == 2
    # A string is a user turn of the chat template, so these are the same prompt.
    assert model.predict([{"role": "user", "content": "a bare string"}]) == bare
    assert model.predict(pd.DataFrame({"id": [7], "prompt": ["a bare string"]})) == bare

    status, body = _post(served_model, {"inputs": "a bare string"})
    assert status == 200, body
    assert json.loads(body) == {"predictions": bare}

    status, body = _post(served_model, {"inputs": ["a bare string", "Order from Mei Tanaka: three travel mugs."]})
    assert status == 200, body
    assert json.loads(body) == {"predictions": pair}

    status, body = _post(served_model, {"inputs": [[{"role": "user", "content": "a bare string"}]]})
    assert status == 200, body
    assert json.loads(body) == {"predictions": bare}

    for bad in (42, [42], [[{"role": "user"}]]):
        status, body = _post(served_model, {"inputs": bad})
        assert 400 <= status < 500, (bad, status, body)
        assert "Traceback" not in body and "stack_trace" not in body
        assert "Expected a prompt string" in json.loads(body)["message"]
