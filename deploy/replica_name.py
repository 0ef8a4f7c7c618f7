"""The name a replica gives itself when nobody names it: ``python -m deploy.replica_name ROLE``.

Kubernetes names the pod (POD_NAME from the downward API). Under compose the
hostname is a bare container ID, so the name comes from Docker's DNS, which
answers a reverse (PTR) query for the container's address with its container
name (``project_daphne_2`` with compose v1, ``project-daphne-2`` with v2): the
replica is then ``daphne-2``, and gunicorn ``gunicorn-1``. The query goes to
the resolver itself: the C library would answer it from /etc/hosts, which
holds only the hostname. Anywhere else, the hostname.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys

TIMEOUT_SECONDS = 1.0


def compose_name(container: str, role: str) -> str | None:
    """``daphne-2`` for ``<project>_daphne_2`` or ``<project>-daphne-2``, else None."""
    match = re.fullmatch(rf".+[_-]{re.escape(role)}[_-](\d+)", container)
    return f"{role}-{match.group(1)}" if match else None


def nameserver() -> str | None:
    try:
        with open("/etc/resolv.conf") as conf:
            for line in conf:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    return fields[1]
    except OSError:
        pass
    return None


def _name_at(packet: bytes, offset: int) -> str:
    """A (possibly compressed) domain name in a DNS message."""
    labels = []
    while packet[offset]:
        if packet[offset] >= 0xC0:  # a pointer to a name earlier in the message
            offset = struct.unpack_from("!H", packet, offset)[0] & 0x3FFF
            continue
        length = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + length].decode())
        offset += 1 + length
    return ".".join(labels)


def reverse_lookup(address: str, server: str) -> str | None:
    """The first PTR answer for an IPv4 address, asked of ``server`` over UDP."""
    query_id = int.from_bytes(os.urandom(2), "big")
    question = (
        b"".join(bytes([len(part)]) + part.encode() for part in [*reversed(address.split(".")), "in-addr", "arpa"])
        + b"\0"
    )
    packet = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 12, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT_SECONDS)
        sock.sendto(packet, (server, 53))
        answer = sock.recv(4096)
    answer_id, flags, _, answers = struct.unpack_from("!HHHH", answer)
    if answer_id != query_id or flags & 0x000F or not answers:
        return None
    offset = 12 + len(question) + 4
    offset += 2 if answer[offset] >= 0xC0 else len(_name_at(answer, offset)) + 2  # the answer's owner name
    record_type = struct.unpack_from("!H", answer, offset)[0]
    return _name_at(answer, offset + 10) if record_type == 12 else None


def replica_name(role: str) -> str:
    hostname = socket.gethostname()
    server = nameserver()
    try:
        container = reverse_lookup(socket.gethostbyname(hostname), server) if server else None
    except (OSError, struct.error, IndexError, UnicodeDecodeError):
        container = None
    return (container and compose_name(container.split(".")[0], role)) or hostname


if __name__ == "__main__":
    print(replica_name(sys.argv[1]))
