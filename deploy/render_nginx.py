"""Render nginx/nginx.conf.template for the local stack and the tests.

The nginx image's entrypoint is the one renderer (``docker-entrypoint.sh
render``): this module runs it with the inputs the template's header lists,
taking the defaults the image sets (its Dockerfile's ENV) and overriding what
differs outside a container. A missing or contradictory input is an error, as
it is at a container's start.

    python -m deploy.render_nginx --port 8080 --runtime-dir /tmp/nginx \
        --daphne 127.0.0.1:8001,127.0.0.1:8002 --gunicorn 127.0.0.1:8100 -o nginx.conf
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

NGINX_DIR = Path(__file__).resolve().parent.parent / "nginx"
TEMPLATE = NGINX_DIR / "nginx.conf.template"
ENTRYPOINT = NGINX_DIR / "docker-entrypoint.sh"
DOCKERFILE = NGINX_DIR / "Dockerfile"


def image_defaults() -> dict[str, str]:
    """The ENV the nginx image sets: the inputs' defaults, in one place."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    block = re.search(r"^ENV\s+(.+)$", text, re.M).group(1)
    return dict(word.split("=", 1) for word in shlex.split(block))


def render(values: dict[str, str], template: Path = TEMPLATE) -> str:
    """The configuration the image would write, given these inputs over its defaults."""
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NGINX_TEMPLATE": str(template)}
    environment |= image_defaults() | values
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "render"], env=environment, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise ValueError(result.stderr.strip())
    return result.stdout


def values_for(
    *,
    port: int,
    runtime_dir: str,
    gunicorn: list[str],
    daphne: list[str] | None = None,
    daphne_dns_name: str = "",
    resolver: str = "",
    **more: str,
) -> dict[str, str]:
    """Inputs for fixed Daphne addresses (``daphne``) or a name resolved while running.

    ``more`` adds any other input by its name (NGINX_TLS_CERTIFICATE=..., ...).
    """
    return {
        "NGINX_LISTEN_PORT": str(port),
        "NGINX_RUNTIME_DIR": runtime_dir,
        "DAPHNE_ADDRESSES": " ".join(daphne or []),
        "DAPHNE_DNS_NAME": daphne_dns_name,
        "GUNICORN_ADDRESSES": " ".join(gunicorn),
        "NGINX_RESOLVER": resolver,
        **more,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--runtime-dir", required=True)
    pool = parser.add_mutually_exclusive_group(required=True)
    pool.add_argument("--daphne", help="comma-separated host:port list (fixed addresses)")
    pool.add_argument("--daphne-dns-name", help="host:port resolved while running (needs --resolver)")
    parser.add_argument("--gunicorn", required=True, help="comma-separated host:port list")
    parser.add_argument("--resolver", default="", help="DNS server addresses, or auto (/etc/resolv.conf)")
    parser.add_argument("-o", "--output", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    try:
        text = render(
            values_for(
                port=args.port,
                runtime_dir=args.runtime_dir,
                daphne=args.daphne.split(",") if args.daphne else None,
                daphne_dns_name=args.daphne_dns_name or "",
                gunicorn=args.gunicorn.split(","),
                resolver=args.resolver,
            )
        )
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
