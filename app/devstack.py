"""`make run`: the whole service on one machine, with embedded defaults for what is not set.

- Redis: unless REDIS_URL is set, starts `redis-server` on 127.0.0.1 (a free
  port), data under `.local/redis/` with AOF on. The binary is `$REDIS_SERVER`
  if set, else `redis-server` on PATH.
- Mail: unless MAIL_SERVER is set, starts the SMTP sink (app/devsink.py) on
  127.0.0.1, which stores every message under `.local/outbox/` and logs one
  line per message; MAIL_DEV_OUTBOX tells every process where that folder is.
- SECRET_KEY and API_TOKEN: unless set, generated once and kept in `.local/`.
- While it runs, `.local/devstack.env` holds the settings it chose, so another
  shell can `. .local/devstack.env` and use the same Redis and sink.
- Then runs the Procfile's processes (web, worker, scheduler) with honcho.
  Ctrl-C (or SIGTERM, or the terminal hanging up) stops them, then the sink and
  Redis it started.
- One stack per `.local/` (a lock file): a second would load this one's Redis
  data and deliver its queued mail again. The web port is checked before
  anything starts.

The environment and a `.env` in the working directory are read as the app
reads them; whatever this sets is exported to every process.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType

from app import PROJECT_ROOT
from app import config as settings
from app.config import SPEC
from app.errors import ConfigError

INSTALL_HINT = (
    "redis-server not found. Install it (Debian/Ubuntu: sudo apt-get install redis-server; "
    "macOS: brew install redis), or set REDIS_SERVER=/path/to/redis-server, "
    "or set REDIS_URL to use a Redis that is already running."
)


class DevStackError(Exception):
    """Something the dev stack needs is missing or would not start."""


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} devstack  | {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    """Poll `ready` for up to 15 s; fail early if `process` exits."""
    deadline = time.monotonic() + 15
    while not ready():
        if process.poll() is not None:
            raise DevStackError(f"{what} exited with status {process.returncode} at start-up")
        if time.monotonic() > deadline:
            raise DevStackError(f"{what} did not become ready within 15 s")
        time.sleep(0.05)


def answers(port: int, probe: bytes, expect: bytes) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                if probe:
                    sock.sendall(probe)
                return sock.recv(64).startswith(expect)
        except OSError:
            return False

    return check


@contextmanager
def running(args: list[str], what: str) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session (so a terminal's Ctrl-C reaches it only through us,
    after the app processes have stopped), terminated and reaped on the way out."""
    process = subprocess.Popen(args, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        say(f"{what} stopped")


def find_redis_server() -> str:
    configured = os.environ.get("REDIS_SERVER")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise DevStackError(f"REDIS_SERVER={configured} is not an executable file")
        return configured
    found = shutil.which("redis-server")
    if found is None:
        raise DevStackError(INSTALL_HINT)
    return found


@contextmanager
def single_instance(local: Path) -> Iterator[None]:
    """Hold `local`/devstack.lock while the stack runs: a second stack on the same
    folder would start a Redis on this one's append-only file, and its worker would
    deliver the mail still queued here a second time."""
    handle = (local / "devstack.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise DevStackError(
            f"another `make run` is already running on {local} (pid {holder}): "
            "use that one, or stop it first (Ctrl-C in its terminal)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # the lock goes with it


def check_port(host: str, port: str) -> None:
    """The web server's port, before anything starts (gunicorn would retry it for a
    while, with the worker already running)."""
    try:
        number = int(port)
    except ValueError:
        raise DevStackError(f"PORT={port!r} is not a port number") from None
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, number))
        except OSError as err:
            raise DevStackError(
                f"port {number} on {host} is in use ({err.strerror}): stop what holds it, "
                "or choose another with PORT=..."
            ) from None


def start_redis(stack: ExitStack, local: Path) -> str:
    binary = find_redis_server()
    data = local / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [
        binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
        "--appendonly", "yes", "--save", "", "--daemonize", "no",
        "--logfile", str(data / "redis.log"),
    ]  # fmt: skip
    process = stack.enter_context(running(args, "redis-server"))
    wait_until(answers(port, b"PING\r\n", b"+PONG"), process, "redis-server")
    say(f"redis-server on 127.0.0.1:{port}, data in {data} (AOF on), log {data}/redis.log")
    return f"redis://127.0.0.1:{port}/0"


def start_sink(stack: ExitStack, outbox: Path) -> int:
    port = free_port()
    args = [sys.executable, "-m", "app.devsink", "--port", str(port), "--outbox", str(outbox)]
    process = stack.enter_context(running(args, "mail sink"))
    wait_until(answers(port, b"", b"220"), process, "the mail sink (app.devsink)")
    return port


def persistent_secret(path: Path) -> str:
    """A random secret kept in `path` (created 0600 on first use), the same on every start."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


@contextmanager
def env_file(path: Path, environ: dict[str, str], original: Mapping[str, str]) -> Iterator[None]:
    """While the stack runs, the settings it chose, for `. .local/devstack.env` in another
    shell (flask mail send-test, rq info). Private: it holds the API token."""
    chosen = {
        key: value
        for key, value in environ.items()
        if (key in SPEC or key in ("PORT", "WEB_HOST")) and original.get(key) != value
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# Written by python -m app.devstack while it runs; removed when it stops.\n")
        handle.writelines(f"{key}={shlex.quote(value)}\n" for key, value in sorted(chosen.items()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def run_procfile(environ: dict[str, str]) -> int:
    """Run the Procfile's processes until one exits or we are signalled; honcho's code."""
    from honcho.environ import parse_procfile
    from honcho.manager import Manager

    procfile = parse_procfile((PROJECT_ROOT / "Procfile").read_text())
    manager = Manager()
    for name, command in procfile.processes.items():
        manager.add_process(name, command, env=environ, cwd=str(PROJECT_ROOT))
    manager.loop()
    return int(manager.returncode or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.devstack", description=__doc__)
    parser.add_argument(
        "--local-dir",
        type=Path,
        default=Path(".local"),
        help="where Redis data, the outbox and generated secrets live (default: ./.local)",
    )
    args = parser.parse_args(argv)
    local: Path = args.local_dir.resolve()

    # Until honcho takes over the signals, SIGTERM unwinds like Ctrl-C does.
    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)

    def hung_up(signum: int, frame: FrameType | None) -> None:
        # The terminal closed (or the SSH session dropped): the processes we started run
        # in their own sessions and never hear of it. Stop as on SIGTERM, with output
        # going nowhere now that the terminal cannot take it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        os.kill(os.getpid(), signal.SIGTERM)  # ours until honcho runs, then honcho's

    signal.signal(signal.SIGHUP, hung_up)

    settings.load_dotenv_file()
    environ = dict(os.environ)
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    environ["PYTHONUNBUFFERED"] = "1"
    environ.setdefault("PORT", "5000")
    environ.setdefault("WEB_HOST", "127.0.0.1")
    environ.setdefault("PUBLIC_URL", f"http://localhost:{environ['PORT']}")

    try:
        with ExitStack() as stack:
            local.mkdir(parents=True, exist_ok=True)
            stack.enter_context(single_instance(local))
            check_port(environ["WEB_HOST"], environ["PORT"])
            if not environ.get("REDIS_URL"):
                environ["REDIS_URL"] = start_redis(stack, local)
            if not environ.get("MAIL_SERVER"):
                outbox = local / "outbox"
                port = start_sink(stack, outbox)
                environ.update(
                    MAIL_SERVER="127.0.0.1",
                    MAIL_PORT=str(port),
                    MAIL_USE_TLS="false",
                    MAIL_USE_SSL="false",
                    MAIL_USERNAME="",
                    MAIL_PASSWORD="",
                    MAIL_DEV_OUTBOX=str(outbox),
                )
                say(f"mail sink on 127.0.0.1:{port}: every message lands in {outbox}/")
            for key in ("SECRET_KEY", "API_TOKEN"):
                if not environ.get(key):
                    environ[key] = persistent_secret(local / key.lower())
            check_config(environ)
            stack.enter_context(env_file(local / "devstack.env", environ, os.environ))
            banner(environ, local)
            code = run_procfile(environ)
    except KeyboardInterrupt:
        return 0
    except (DevStackError, ConfigError) as err:
        say(f"error: {err}")
        return 1
    # honcho answers 130/143 when it was told to stop; anything else means a process died.
    if code in (130, 143):
        say("stopped")
        return 0
    say(f"a process exited (status {code}); everything was stopped")
    return code or 1


def check_config(environ: dict[str, str]) -> None:
    """Fail here, with one line naming the key, rather than in three processes at once."""
    from app import create_app

    saved = dict(os.environ)
    os.environ.update(environ)
    try:
        create_app()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def banner(environ: dict[str, str], local: Path) -> None:
    base = f"http://127.0.0.1:{environ['PORT']}"
    if environ.get("API_TOKEN") == _read(local / "api_token"):
        token = environ["API_TOKEN"]
        where = f"(kept in {local / 'api_token'})"
    else:
        token, where = "$API_TOKEN", "(from your environment)"
    say(f"web on {base} (health: {base}/healthz)")
    say(f"API token {where}: {token}")
    say(
        f'try: curl -H "Authorization: Bearer {token}" -H "Content-Type: application/json" '
        f'-d \'{{"to": "you@example.com", "subject": "Hello", "template": "test", '
        f'"context": {{"address": "you"}}}}\' {base}/api/mail'
    )
    say("Ctrl-C stops everything")


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


if __name__ == "__main__":
    sys.exit(main())
