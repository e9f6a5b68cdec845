"""A replicated Redis on loopback for the Sentinel tests: a master (AOF), a replica and
three sentinels (`redis-server --sentinel`), each a real process on a free port."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from tests.servers import RedisServer, free_port, wait_until

MASTER_NAME = "mymaster"
# Sentinel's timings, short so a failover takes seconds: the master is called down after
# 1 s without a reply, and a failover that stalls is given up and retried after 3 s.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


class SentinelServer:
    """`redis-server <conf> --sentinel` on a free port, monitoring one master."""

    def __init__(self, master_port: int, password: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mq-sentinel-"))
        self.port = free_port()
        self.password = password
        self.master_port = master_port
        self.process: subprocess.Popen[bytes] | None = None
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if password:  # asked of clients, and of each other
            lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
        (self.dir / "sentinel.conf").write_text("\n".join(lines) + "\n")

    def start(self) -> SentinelServer:
        binary = shutil.which("redis-server") or "redis-server"
        conf = str(self.dir / "sentinel.conf")  # sentinel rewrites it: its own copy
        self.process = subprocess.Popen(
            [binary, conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not wait_until(lambda: self.call(lambda r: r.ping()) is not None, timeout=10):
            raise RuntimeError(f"redis sentinel did not start on port {self.port}")
        return self

    def call(self, command: Callable[[Redis], Any]) -> Any:
        """One command to this sentinel; None when it does not answer."""
        try:
            with Redis(port=self.port, password=self.password, socket_timeout=1) as client:
                return command(client)
        except (RedisError, OSError):
            return None

    def master_port_now(self) -> int | None:
        reply = self.call(lambda r: r.sentinel_get_master_addr_by_name(MASTER_NAME))
        if not isinstance(reply, list | tuple) or len(reply) != 2:
            return None
        return int(reply[1])

    def knows_everyone(self, sentinels: int, replicas: int) -> bool:
        master = self.call(lambda r: r.sentinel_master(MASTER_NAME))
        if not isinstance(master, dict):
            return False
        return (
            int(master.get("num-other-sentinels", 0)) >= sentinels - 1
            and int(master.get("num-slaves", 0)) >= replicas
        )

    def cleanup(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelCluster:
    """A master, one replica of it and three sentinels; `servers` by port, as the
    master and the replica swap roles in a failover."""

    def __init__(self, sentinel_password: str | None = None) -> None:
        self.master = RedisServer(appendonly=True)
        self.replica = RedisServer(appendonly=True)
        self.replica.extra_args = ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.sentinels = [SentinelServer(self.master.port, sentinel_password) for _ in range(3)]

    def start(self) -> SentinelCluster:
        try:
            return self._start()
        except BaseException:
            self.cleanup()
            raise

    def _start(self) -> SentinelCluster:
        self.master.start()
        self.replica.start()
        if not wait_until(lambda: self.in_sync(self.replica), timeout=20):
            raise RuntimeError("the replica did not sync with the master")
        for sentinel in self.sentinels:
            sentinel.start()
        # A failover needs a quorum of sentinels that know each other and the replica.
        if not wait_until(lambda: all(s.knows_everyone(3, 1) for s in self.sentinels), timeout=30):
            raise RuntimeError("the sentinels did not discover each other and the replica")
        return self

    @property
    def setting(self) -> str:
        """REDIS_SENTINELS for this cluster."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def url(self) -> str:
        """REDIS_URL for this cluster: its host is ignored under Sentinel."""
        return "redis://sentinel-picks-the-host:6379/0"

    @property
    def servers(self) -> dict[int, RedisServer]:
        return {self.master.port: self.master, self.replica.port: self.replica}

    def current_master(self) -> RedisServer | None:
        """The server every sentinel names master now (None while they disagree)."""
        ports = {s.master_port_now() for s in self.sentinels if s.process is not None}
        if len(ports) != 1:
            return None
        port = ports.pop()
        return self.servers.get(port) if port is not None else None

    def wait_promoted(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Block until every sentinel names another master than `old` and it answers as one."""

        def promoted() -> bool:
            master = self.current_master()
            return master is not None and master is not old and self.role(master) == "master"

        if not wait_until(promoted, timeout=timeout, interval=0.05):
            raise AssertionError(f"no failover within {timeout} s")
        master = self.current_master()
        assert master is not None
        return master

    @staticmethod
    def info(server: RedisServer) -> dict[str, object]:
        try:
            with Redis(port=server.port, socket_timeout=1) as client:
                return dict(client.info("replication"))
        except (RedisError, OSError):
            return {}

    def role(self, server: RedisServer) -> str | None:
        role = self.info(server).get("role")
        return str(role) if role else None

    def in_sync(self, replica: RedisServer) -> bool:
        """`replica` replicates and its link to the master is up."""
        info = self.info(replica)
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def replicas_of(self, master: RedisServer) -> int:
        return int(str(self.info(master).get("connected_slaves", 0)))

    def cleanup(self) -> None:
        for sentinel in self.sentinels:
            sentinel.cleanup()
        self.master.cleanup()
        self.replica.cleanup()
