"""The container files agree with each other and with the rest of the blueprint.

No Docker needed: these read the Dockerfiles, docker-compose.yml and
.env.example, so drift (a tag, a port, an upstream line, an undocumented
variable) fails on any machine, not only where containers run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.render_nginx import image_defaults
from loadtest.compose_stack import APP_IMAGE, COMPOSE_FILE, NGINX_APP_IMAGE, REPO, compose_variables
from tests.manifests.sources import nginx_inputs

ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILES = [REPO / "Dockerfile", REPO / "nginx" / "Dockerfile"]


def env_example() -> dict[str, str]:
    """NAME -> value of every variable .env.example sets or shows commented out."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#? ?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def dockerfile_arg(path: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} has no ARG {name} with a default"
    return match.group(1)


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_compose_variable_is_documented_in_env_example():
    documented, read = set(env_example()), set(compose_variables())
    assert read - documented == set(), "read by docker-compose.yml, missing from .env.example"
    # The image variables are read by the Makefile and the builds as well.
    assert documented - read == set(), "in .env.example, read by nobody"


def test_env_example_shows_the_compose_variables():
    shown = env_example()
    assert {name: shown[name] for name in compose_variables()} == compose_variables()


@pytest.mark.parametrize(
    "variable, pinned_in",
    [
        ("PYTHON_IMAGE", "Dockerfile"),
        ("NGINX_IMAGE", "nginx/Dockerfile"),
        ("REDIS_IMAGE", None),
        ("APP_IMAGE", None),
        ("NGINX_APP_IMAGE", None),
    ],
)
def test_image_defaults_are_pinned_and_agree(variable, pinned_in):
    default = compose_variables()[variable]
    if pinned_in:
        assert dockerfile_arg(REPO / pinned_in, variable) == default
    name, _, tag = default.rpartition(":")
    assert name and re.fullmatch(r"\d+\.\d+(\.\d+)?(-[a-z0-9.-]+)?", tag), f"{default} is not pinned to a version"
    assert {"APP_IMAGE": APP_IMAGE, "NGINX_APP_IMAGE": NGINX_APP_IMAGE}.get(variable, default) == default


def test_compose_nginx_resolves_the_scaled_service_while_running():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    nginx = services["nginx"]["environment"]
    assert set(nginx) <= nginx_inputs()
    # The scaled service by name, re-resolved (no reload after a scale); the
    # resolver is the image's default, auto: Docker's DNS from /etc/resolv.conf.
    assert nginx["DAPHNE_DNS_NAME"] == f"daphne:{services['daphne']['expose'][0]}"
    assert nginx["GUNICORN_ADDRESSES"] == f"gunicorn:{services['gunicorn']['expose'][0]}"
    assert "NGINX_RESOLVER" not in nginx and image_defaults()["NGINX_RESOLVER"] == "auto"
    nginx_dockerfile = (REPO / "nginx" / "Dockerfile").read_text()
    assert "NGINX_LISTEN_PORT=8080" in nginx_dockerfile
    assert services["nginx"]["ports"] == ["${NGINX_BIND:-127.0.0.1}:${NGINX_PORT:-8080}:8080"]


def test_scaled_service_has_no_fixed_name_or_host_port():
    daphne = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["daphne"]
    assert "container_name" not in daphne and "ports" not in daphne
    assert "POD_NAME" not in daphne["environment"]
