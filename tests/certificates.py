"""Throwaway self-signed certificates for the tests' TLS servers (Redis, nginx)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(directory: Path, name: str = "server", common_name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for ``common_name`` (an IP address or a host name) and its key, valid one day."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    kind = "IP" if common_name.replace(".", "").isdigit() else "DNS"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={common_name}",
         "-addext", f"subjectAltName={kind}:{common_name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
