"""The local stack as a fixture that proves, after every test, that it left nothing behind."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deploy.stack import LocalStack


def leftovers(pids: list[int], ports: dict[str, int]) -> list[str]:
    """What is still running or listening of a stack that was stopped."""
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            found.append(f"pid {pid} still running: {command}")
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                found.append(f"{name}'s port {port} still accepts connections")
    return found


@contextmanager
def checked_stack(**options) -> Iterator[LocalStack]:
    """A LocalStack that, once stopped, must have left no process and no listening port."""
    with LocalStack(**options) as stack:
        yield stack
        pids, ports = stack.pids(), stack.ports
    # redis + daphnes + gunicorn and its 2 workers + nginx and a worker at least:
    # the record must hold the real process tree, or the check below proves nothing.
    assert len(pids) >= len(stack.replica_names) + 6, (
        f"only {len(pids)} stack processes were found while it ran: {pids}"
    )
    assert leftovers(pids, ports) == []


@pytest.fixture
def local_stack():
    """Redis, 3 Daphne replicas, gunicorn and nginx, checked for leftovers afterwards."""
    with checked_stack(replicas=3) as stack:
        yield stack
