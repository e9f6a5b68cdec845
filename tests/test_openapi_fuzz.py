"""Schemathesis, an independent OpenAPI fuzzer, finds nothing wrong with the running API.

The web app runs on a real (threaded Werkzeug) server against the throw-away Redis;
schemathesis's own CLI reads /api/openapi.json and runs every check with valid and
invalid data, including the links from a created mail to its status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

from tests.conftest import API_TOKEN

pytestmark = pytest.mark.slow

# Bounded so the run takes seconds: examples per operation, one seed (reproducible).
MAX_EXAMPLES = 20
SEED = 1
PHASES = "examples,coverage,fuzzing,stateful"


@pytest.fixture
def api_url(app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_schemathesis_reports_no_failure(api_url: str, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is in the test extra"
    command = [st, "run", f"{api_url}/api/openapi.json", "--checks", "all", "--mode", "all"]
    command += ["-H", f"Authorization: Bearer {API_TOKEN}", "--phases", PHASES]
    command += ["--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "2"]
    command += ["--no-color", "--report-dir", str(tmp_path)]
    # tests/schemathesis_hooks.py: date-times within the API's documented bound.
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": root}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=100, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert "passed" in result.stdout


def test_a_405_says_which_methods_are_allowed(app: Flask, auth: dict[str, str]) -> None:
    response = app.test_client().delete("/api/mail", headers=auth)
    assert response.status_code == 405
    assert response.get_json() == {"error": "The method is not allowed for the requested URL."}
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST", "OPTIONS"}
