"""Render nginx/nginx.conf.template: the one nginx config, filled in per way of running.

Only dollar-brace UPPERCASE placeholders are replaced (nginx's own ``$variables``
are lowercase and stay). A placeholder without a value, or a value without a
placeholder, is an error: a rendering never ships half-filled.

    python -m deploy.render_nginx --port 8080 --runtime-dir /tmp/nginx \
        --daphne 127.0.0.1:8001,127.0.0.1:8002 --gunicorn 127.0.0.1:8100 -o nginx.conf
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "nginx" / "nginx.conf.template"
DAPHNE_SERVER_OPTIONS = "max_fails=0"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def render(values: dict[str, str], template: str | None = None) -> str:
    text = TEMPLATE.read_text() if template is None else template
    wanted = set(PLACEHOLDER.findall(text))
    missing = sorted(wanted - values.keys())
    unused = sorted(values.keys() - wanted)
    if missing or unused:
        raise ValueError(f"nginx template placeholders: missing {missing}, unknown {unused}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def server_lines(addresses: list[str], options: str = "") -> str:
    """``server host:port;`` lines for an upstream block."""
    if not addresses:
        raise ValueError("an upstream needs at least one server")
    suffix = f" {options}" if options else ""
    return " ".join(f"server {address}{suffix};" for address in addresses)


def values_for(
    *, port: int, runtime_dir: str, daphne: list[str], gunicorn: list[str], resolver: str = ""
) -> dict[str, str]:
    return {
        "NGINX_LISTEN_PORT": str(port),
        "NGINX_RUNTIME_DIR": runtime_dir,
        # max_fails=0: never mark a replica down. A refused connect is retried
        # on the next replica within the same handshake (proxy_next_upstream),
        # and with least_conn, marking replicas down during a rolling restart
        # left nginx answering "no live upstreams" (502) for tens of seconds
        # after every replica was back (seen in test_rolling_restart).
        "DAPHNE_SERVERS": server_lines(daphne, DAPHNE_SERVER_OPTIONS),
        "GUNICORN_SERVERS": server_lines(gunicorn),
        "NGINX_RESOLVER": f"resolver {resolver} valid=5s;" if resolver else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--daphne", required=True, help="comma-separated host:port list")
    parser.add_argument("--gunicorn", required=True, help="comma-separated host:port list")
    parser.add_argument("--resolver", default="", help="DNS resolver address, when upstreams are names")
    parser.add_argument("-o", "--output", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    text = render(
        values_for(
            port=args.port,
            runtime_dir=args.runtime_dir,
            daphne=args.daphne.split(","),
            gunicorn=args.gunicorn.split(","),
            resolver=args.resolver,
        )
    )
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
