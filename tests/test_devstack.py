"""The dev stack (`python -m app.devstack`, what `make run` runs)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest

from app import devstack
from tests.helpers import subprocess_env
from tests.servers import free_port, wait_until


def test_redis_server_from_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "my-redis"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("REDIS_SERVER", str(fake))
    assert devstack.find_redis_server() == str(fake)
    monkeypatch.setenv("REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(devstack.DevStackError, match=r"REDIS_SERVER=.*missing is not an exec"):
        devstack.find_redis_server()


def test_missing_redis_server_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", str(free_port()))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = devstack.main(["--local-dir", str(tmp_path / ".local")])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert code == 1
    output = capsys.readouterr().out
    assert "redis-server not found" in output
    assert "apt-get install redis-server" in output and "REDIS_SERVER=" in output


def test_generated_secrets_persist_and_are_private(tmp_path: Path) -> None:
    first = devstack.persistent_secret(tmp_path / "api_token")
    assert len(first) >= 40
    assert devstack.persistent_secret(tmp_path / "api_token") == first
    assert stat.S_IMODE((tmp_path / "api_token").stat().st_mode) == 0o600
    assert devstack.persistent_secret(tmp_path / "secret_key") != first


def descendants(root: int) -> set[int]:
    """Every live process below `root`, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def http(url: str, body: dict[str, Any] | None = None, token: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(url, method="POST" if body is not None else "GET")  # noqa: S310
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)
    except OSError:
        return 0, None


def start_stack(
    tmp_path: Path, local: Path, port: int, name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.devstack", "--local-dir", str(local)],
            cwd=tmp_path,
            env=subprocess_env(PORT=str(port)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log


@pytest.mark.slow
def test_dev_stack_end_to_end(tmp_path: Path) -> None:
    """Start it as `make run` does, send a mail through the API, find the .eml, Ctrl-C."""
    local = tmp_path / ".local"
    port = free_port()
    process, log = start_stack(tmp_path, local, port, "devstack")

    def output() -> str:
        return log.read_text(errors="replace")

    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_until(
            lambda: (
                process.poll() is not None
                or (lambda r: r[0] == 200 and r[1]["workers"] >= 1)(http(f"{base}/healthz"))
            ),
            timeout=60,
            interval=0.2,
        )
        assert ready and process.poll() is None, output()

        token = (local / "api_token").read_text().strip()
        assert output().count(token) >= 1  # printed for the user
        body = {"to": "you@example.com", "subject": "Hi", "template": "test",
                "context": {"address": "you"}}  # fmt: skip
        code, reply = http(f"{base}/api/mail", body, token)
        assert code == 202, reply

        outbox = local / "outbox"
        assert wait_until(lambda: list(outbox.glob("*.eml")), timeout=30), output()
        [eml] = list(outbox.glob("*.eml"))  # exactly one so far
        message = BytesParser(policy=default_policy).parsebytes(eml.read_bytes())
        assert message["Message-ID"].startswith(f"<{reply['id']}@")
        assert message.get_content_type() == "multipart/alternative"
        assert wait_until(lambda: f"file={eml}" in output(), timeout=10), output()
        # The sink writes the file before it answers 250; `sent` is recorded after that reply.
        assert wait_until(
            lambda: http(f"{base}/api/mail/{reply['id']}", token=token)[1]["status"] == "sent",
            timeout=10,
        ), http(f"{base}/api/mail/{reply['id']}", token=token)

        # Another shell, as the README says: source .local/devstack.env, flask mail send-test.
        env_file = local / "devstack.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        sent = subprocess.run(
            ["/bin/sh", "-c", f"set -a; . {env_file}; set +a; flask --app app mail send-test "
             "cli@example.com"],
            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert wait_until(lambda: len(list(outbox.glob("*.eml"))) == 2, timeout=30), output()
        assert (local / "redis" / "appendonlydir").is_dir()  # AOF on, under .local/redis

        children = descendants(process.pid)
        assert len(children) >= 6, output()  # redis, sink, honcho's runners, web, worker, ...
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, output()
        stop_seconds = time.monotonic() - started
        assert wait_until(lambda: not any(alive(pid) for pid in children), timeout=10), [
            pid for pid in children if alive(pid)
        ]
        assert "redis-server stopped" in output() and "mail sink stopped" in output()
        assert not env_file.exists()
        assert stop_seconds < 15
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_one_stack_per_folder_and_port_and_a_hang_up_stops_everything(tmp_path: Path) -> None:
    """A second `make run` on the same .local/ would replay the first one's Redis data
    and deliver its queued mail again: it is refused, as is a taken web port, before
    anything starts. Closing the terminal (SIGHUP) stops every process, as Ctrl-C does."""
    local, port = tmp_path / ".local", free_port()
    started: list[subprocess.Popen[bytes]] = []

    def stack(folder: Path, web_port: int, name: str) -> tuple[subprocess.Popen[bytes], Path]:
        process, log = start_stack(tmp_path, folder, web_port, name)
        started.append(process)
        return process, log

    try:
        first, first_log = stack(local, port, "first")
        assert wait_until(
            lambda: first.poll() is not None or http(f"http://127.0.0.1:{port}/healthz")[0] == 200,
            timeout=60,
            interval=0.2,
        )
        assert first.poll() is None, first_log.read_text()

        second, second_log = stack(local, free_port(), "second")
        assert second.wait(timeout=30) == 1
        said = second_log.read_text()
        assert "another `make run` is already running on" in said and str(first.pid) in said
        assert "redis-server on" not in said  # nothing was started
        assert (local / "devstack.env").exists()  # the first stack's, left alone

        third, third_log = stack(tmp_path / "other", port, "third")
        assert third.wait(timeout=30) == 1
        assert f"port {port} on 127.0.0.1 is in use" in third_log.read_text()

        children = descendants(first.pid)
        assert len(children) >= 6, first_log.read_text()
        first.send_signal(signal.SIGHUP)
        assert first.wait(timeout=30) == 0
        assert wait_until(lambda: not any(alive(pid) for pid in children), timeout=10), [
            pid for pid in children if alive(pid)
        ]
        assert not (local / "devstack.env").exists()
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
