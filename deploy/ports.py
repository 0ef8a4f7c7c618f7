"""Free ports for servers started on this machine.

Chosen below the kernel's ephemeral range (``ip_local_port_range``), where
the kernel never puts a client socket: a port taken from inside it can be
picked by one of the thousands of outgoing connections a load test opens
between the choice and the server's bind (seen: nginx's bind failing with
"Address already in use" after a phase that opened 17,000 sockets).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# The lowest port handed out: above the well-known and the usual service ports.
LOWEST = 10_000


def _candidates() -> list[int]:
    try:
        ephemeral_start = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32768  # Linux's default
    if ephemeral_start - LOWEST < 1000:  # a range that starts low: fall back to the kernel's choice
        return []
    ports = list(range(LOWEST, ephemeral_start))
    random.shuffle(ports)
    return ports


def _bindable(sock: socket.socket, port: int) -> bool:
    # Every address (as nginx and the replicas in containers bind), so a port
    # held on any loopback address counts as taken.
    try:
        sock.bind(("0.0.0.0", port))
    except OSError:
        return False
    return True


def free_ports(count: int) -> list[int]:
    """Distinct free ports: all are held open until all are chosen."""
    sockets: list[socket.socket] = []
    try:
        for port in _candidates():
            if len(sockets) == count:
                break
            sock = socket.socket()
            if _bindable(sock, port):
                sockets.append(sock)
            else:
                sock.close()
        while len(sockets) < count:  # no room below the ephemeral range: the kernel picks
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return _bindable(sock, port)
