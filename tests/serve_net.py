"""Watch a process tree's internet sockets and report any that reach beyond loopback (127.0.0.0/8, ::1)."""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psutil


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, a dual-stack socket's view of IPv4 loopback
    return addr.is_loopback


@dataclass(frozen=True)
class Sock:
    pid: int
    process: str
    kind: str  # "tcp" / "udp"
    local: tuple[str, int] | None
    remote: tuple[str, int] | None
    status: str

    def problem(self) -> str | None:
        """Why this socket is not loopback-only, or None. A listening / unconnected socket must be bound to
        loopback (a wildcard address such as 0.0.0.0 or :: listens on every interface); a connected one
        must have a loopback peer."""
        if self.remote:
            if not is_loopback(self.remote[0]):
                return f"peer {self.remote[0]}:{self.remote[1]}"
        elif self.local and not is_loopback(self.local[0]):
            return f"{'listening' if self.status == psutil.CONN_LISTEN else 'bound'} on {self.local[0]}:{self.local[1]}"
        return None

    def __str__(self) -> str:
        return f"{self.process}[{self.pid}] {self.kind} {self.local} -> {self.remote} {self.status}"


class SocketWatch:
    """Samples the inet sockets of `pid` (and, with `tree`, of all its descendants) every `interval` seconds in
    a background thread, from `start()` to `stop()`. Sampling cannot see a socket that lives less than one
    interval; it sees every listener and every connection that stays open a moment."""

    def __init__(self, pid: int, tree: bool = True, interval: float = 0.02) -> None:
        self.pid, self.tree, self.interval = pid, tree, interval
        self.seen: set[Sock] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="socket-watch", daemon=True)

    def start(self) -> SocketWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # one last look

    def __enter__(self) -> SocketWatch:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *(root.children(recursive=True) if self.tree else [])]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        for proc in self.processes():
            try:
                name = proc.name()
                conns: list[Any] = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            for c in conns:
                self.seen.add(Sock(
                    pid=proc.pid, process=name, kind="tcp" if c.type == 1 else "udp",
                    local=(c.laddr.ip, c.laddr.port) if c.laddr else None,
                    remote=(c.raddr.ip, c.raddr.port) if c.raddr else None,
                    status=c.status,
                ))
        self.samples += 1

    def violations(self) -> list[str]:
        return sorted({f"{s.problem()}  ({s})" for s in self.seen if s.problem()})

    def listening(self) -> set[tuple[str, int]]:
        return {s.local for s in self.seen if s.status == psutil.CONN_LISTEN and s.local}
