"""What the other sources of truth say: the image, compose, nginx, the README.

Each reader returns plain values (names, ports, paths) for the consistency
tests to compare with the rendered manifests.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.manifests.render import ROOT
from tests.required import unavailable

ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
NGINX_TEMPLATE = ROOT / "nginx" / "nginx.conf.template"
COMPOSE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"
# The app image's roles that serve HTTP, and the Deployments that run them.
APP_ROLES = ("daphne", "gunicorn")
# ${NAME} or ${NAME:-default} in compose: the default is what runs unset.
COMPOSE_VARIABLE = re.compile(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}")


def required(path: Path) -> Path:
    """A file another part of the project writes: in CI it must exist; elsewhere
    its absence skips the comparison with a visible reason."""
    if not path.exists():
        unavailable(f"{path.relative_to(ROOT)} does not exist yet: nothing to compare the manifests with")
    return path


def entrypoint_port(role: str) -> int:
    """The port the image's entrypoint binds for a role (`--port N` or `--bind host:N`)."""
    text = ENTRYPOINT.read_text()
    block = re.search(rf"^\s*{role}\)\n(.*?);;", text, re.S | re.M)
    assert block, f"{ENTRYPOINT.name} has no `{role})` case"
    ports = {int(p or b) for p, b in re.findall(r"--port[ =](\d+)|--bind[ =]\S*:(\d+)", block.group(1))}
    assert len(ports) == 1, f"{ENTRYPOINT.name}: expected one port for {role}, found {ports}"
    return ports.pop()


def app_drain_timeout_default() -> float:
    """DRAIN_TIMEOUT_SECONDS's default in the draining Daphne server."""
    text = (ROOT / "app" / "realtime" / "server.py").read_text()
    default = re.search(r"""["']DRAIN_TIMEOUT_SECONDS["']\s*,\s*["']?([\d.]+)""", text)
    assert default, "app/realtime/server.py no longer reads DRAIN_TIMEOUT_SECONDS with a default"
    return float(default.group(1))


def nginx_inputs() -> set[str]:
    """The variables nginx's image renders its config from: the template's header lists them."""
    header = NGINX_TEMPLATE.read_text().split("\n\n", 1)[0]
    return set(re.findall(r"^#\s{3}([A-Z][A-Z0-9_]+)\s", header, re.M))


def nginx_exact_locations() -> set[str]:
    return set(re.findall(r"location\s*=\s*(\S+)\s*\{", NGINX_TEMPLATE.read_text()))


# --- docker-compose.yml ---


def compose_services() -> dict:
    return yaml.safe_load(required(COMPOSE).read_text())["services"]


def with_defaults(value: str) -> str:
    """A compose value as it runs with no variable set."""
    return COMPOSE_VARIABLE.sub(lambda match: match.group(1) or "", value)


def compose_command(service: dict) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def compose_environment_names(service: dict) -> set[str]:
    environment = service.get("environment", {})
    if isinstance(environment, dict):
        return set(environment)
    return {item.split("=", 1)[0] for item in environment}


def compose_healthcheck_urls(service: dict) -> list[tuple[int, str]]:
    """(port, path) of every http://host:port/path in a service's healthcheck."""
    test = service.get("healthcheck", {}).get("test", [])
    text = " ".join(test) if isinstance(test, list) else test
    return [(int(port), path) for port, path in re.findall(r"https?://[^/:\s]+:(\d+)(/[^\s\"']*)", text)]


# --- README.md ---


def readme() -> str:
    return required(README).read_text()


def readme_images(text: str) -> set[str]:
    return set(re.findall(r"\bchannels-blueprint(?:-nginx|-loadtest)?:[\w.-]+", text))


def readme_ports(text: str) -> dict[str, int]:
    """The `Ports: daphne 8000, gunicorn 8001, ...` line."""
    line = re.search(r"^\W*Ports\W*:(.*)$", text, re.M | re.I)
    assert line, "README.md has no `Ports: daphne 8000, gunicorn 8001, nginx 8080, redis 6379` line"
    return {role: int(port) for role, port in re.findall(r"([a-z]+)\W+(\d+)", line.group(1))}


def readme_probe_paths(text: str) -> dict[str, set[str]]:
    """Paths written as `GET /path` (or `/path`), then (`is`) liveness or readiness."""
    found: dict[str, set[str]] = {"liveness": set(), "readiness": set()}
    for path, kind in re.findall(r"`(?:GET\s+)?(/[\w/.-]*)`\W{0,3}(?:is\s+)?(liveness|readiness)", text, re.I):
        found[kind.lower()].add(path)
    return found


def readme_environment_names(text: str) -> set[str]:
    """Names in the first column of the README's tables: | `NAME` | ... |"""
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`\s*\|", text, re.M))
