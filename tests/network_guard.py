"""Tests reach 127.0.0.1 and nothing else: `install` makes every Python-level connection or name
lookup for any other address fail with an OSError naming it.

conftest installs it in the test process; ``tests/sitecustomize.py`` installs it in every Python
subprocess that has ``tests/`` on its PYTHONPATH (the multi-process, preemption and evaluation
tests start theirs that way). Libraries that open sockets in C++ (gRPC inside jax.distributed,
tensorstore) are kept on loopback by the addresses the tests give them and by the environment
`gcs_emulator.configure_environment` sets.
"""

from __future__ import annotations

import ipaddress
import socket

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").lower()
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what) -> OSError:
    return OSError(f"network guard: tests may reach 127.0.0.1 only, not {what!r}")


def install() -> None:
    """Patch `socket` in this process (idempotent)."""
    if getattr(socket, "_percov2_guarded", False):
        return
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo, real_create_connection = socket.getaddrinfo, socket.create_connection

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise _refuse(address)

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            raise _refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        if not _is_local(address[0]):
            raise _refuse(address)
        return real_create_connection(address, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.getaddrinfo, socket.create_connection = getaddrinfo, create_connection
    socket._percov2_guarded = True
