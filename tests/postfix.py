"""A throw-away Postfix instance for tests: its own config, queue and log under a temp
folder, STARTTLS on a free 127.0.0.1 port with a test CA's certificate, relaying every mail
to a recording SMTP server (tests/servers.py) on another port. Nothing of the machine's own
Postfix (/etc/postfix, port 25) is touched or started.

Needs Debian's `postfix` package installed (`apt-get install postfix`) and root (the master
process drops to the `postfix` user). `available()` says whether it can run here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import trustme

POSTFIX = shutil.which("postfix", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
MASTER_CF = Path("/etc/postfix/master.cf")


def available() -> str:
    """ "" when a Postfix instance can be started here, else why not."""
    if POSTFIX is None or not MASTER_CF.exists():
        return "Postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "starting Postfix needs root"
    return ""


class PostfixRelay:
    """`postfix -c <dir> start` with a generated main.cf/master.cf; `stop()` ends it."""

    def __init__(self, port: int, relay_port: int, ca: trustme.CA) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="mq-postfix-"))
        self.config = self.root / "etc"
        self.log = self.root / "maillog"
        self.config.mkdir()
        (self.root / "spool").mkdir()
        (self.root / "data").mkdir()
        # The daemons run as the `postfix` user: it must reach the folder, own its data
        # folder (master.lock, TLS caches) and write the log (postlogd).
        self.root.chmod(0o755)
        self.log.touch()
        for path in (self.root / "data", self.log):
            shutil.chown(path, "postfix", "postfix")
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.config / "server.pem"))
        (self.config / "server.pem").chmod(0o600)
        shutil.copy(MASTER_CF, self.config / "master.cf")
        (self.config / "main.cf").write_text(
            "\n".join(
                [
                    "compatibility_level = 3.6",
                    f"queue_directory = {self.root}/spool",
                    f"data_directory = {self.root}/data",
                    "meta_directory = /etc/postfix",
                    f"maillog_file = {self.log}",
                    f"maillog_file_prefixes = {self.root}",
                    "myhostname = postfix.test",
                    "mydestination =",
                    "inet_interfaces = 127.0.0.1",
                    "inet_protocols = ipv4",
                    "mynetworks = 127.0.0.0/8",
                    "smtpd_relay_restrictions = permit_mynetworks, reject",
                    "alias_maps =",
                    "alias_database =",
                    "local_recipient_maps =",
                    f"relayhost = [127.0.0.1]:{relay_port}",
                    "smtp_dns_support_level = disabled",
                    "smtp_tls_security_level = none",
                    f"smtpd_tls_chain_files = {self.config}/server.pem",
                    "smtpd_tls_security_level = may",
                    "smtpd_tls_received_header = yes",
                    "message_size_limit = 52428800",
                    # Deliver at once; a test should not wait for a retry pass.
                    "queue_run_delay = 1s",
                    "minimal_backoff_time = 1s",
                    "maximal_backoff_time = 2s",
                    "",
                ]
            )
        )
        self._postconf("-M", f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd")
        self._postconf("-MX", "smtp/inet")  # not port 25
        self._postconf("-F", "*/*/chroot = n")  # no chroot: the temp folder is the jail

    def _postconf(self, *args: str) -> None:
        assert POSTFIX is not None
        postconf = str(Path(POSTFIX).with_name("postconf"))  # beside postfix, /usr/sbin
        subprocess.run([postconf, "-c", str(self.config), *args], check=True, timeout=30)

    def start(self) -> PostfixRelay:
        assert POSTFIX is not None
        started = subprocess.run(
            [POSTFIX, "-c", str(self.config), "start"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr}{started.stdout}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"Postfix did not listen on {self.port}: {self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        assert POSTFIX is not None
        subprocess.run(
            [POSTFIX, "-c", str(self.config), "stop"], capture_output=True, timeout=60, check=False
        )
        shutil.rmtree(self.root, ignore_errors=True)
