"""The name a replica gives itself when nobody names it: ``python -m deploy.replica_name ROLE``.

Kubernetes names the pod (POD_NAME from the downward API). Under compose the
hostname is a bare container ID, so the name comes from Docker's DNS, which
answers a reverse lookup of the container's address with its container name
(``project_daphne_2`` with compose v1, ``project-daphne-2`` with v2): the
replica is then ``daphne-2``, and gunicorn ``gunicorn-1``. Anywhere else, the
hostname.
"""
from __future__ import annotations

import re
import socket
import sys


def compose_name(container: str, role: str) -> str | None:
    """``daphne-2`` for ``<project>_daphne_2`` or ``<project>-daphne-2``, else None."""
    match = re.fullmatch(rf".+[_-]{re.escape(role)}[_-](\d+)", container)
    return f"{role}-{match.group(1)}" if match else None


def replica_name(role: str) -> str:
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
        container = socket.gethostbyaddr(address)[0].split(".")[0]
    except OSError:
        return hostname
    return compose_name(container, role) or hostname


if __name__ == "__main__":
    print(replica_name(sys.argv[1]))
