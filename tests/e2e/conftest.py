"""Fixtures of the container tests: a Docker engine (required in CI), the
images built offline, and one compose stack per test module."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from loadtest.compose_stack import (
    APP_IMAGE,
    LOADTEST_IMAGE,
    NGINX_APP_IMAGE,
    REPO,
    ComposeStack,
    compose_command,
    docker_inspect,
    image_size_mb,
    make,
    run,
)
from tests.required import unavailable


def docker_problem() -> str | None:
    """Why the container tests cannot run here, or None."""
    if not shutil.which("docker"):
        return "the docker CLI is not installed"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 30 s"
    if info.returncode != 0:
        return f"no Docker engine answers: {info.stderr.strip()[:300]}"
    if compose_command() is None:
        return "neither the `docker compose` plugin nor docker-compose is installed"
    if not shutil.which("mmdebstrap"):
        return "mmdebstrap is not installed (the offline base images need it: apt-get install mmdebstrap)"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    problem = docker_problem()
    if problem:
        unavailable(f"container tests: {problem}")


@pytest.fixture(scope="session")
def offline_images(docker_engine) -> dict:
    """`make images-offline`: base images from Debian packages (kept when they
    exist), then the app and nginx images on them, with no registry."""
    started = time.monotonic()
    make("images-offline")
    build_seconds = time.monotonic() - started
    base = dict(line.split("=", 1) for line in (REPO / "build" / "base-images.env").read_text().split())
    return {
        "build_seconds": build_seconds,
        "sizes_mb": {
            image: image_size_mb(image) for image in (APP_IMAGE, LOADTEST_IMAGE, NGINX_APP_IMAGE, *base.values())
        },
        "base": base,
    }


@pytest.fixture(scope="module")
def stack(offline_images, tmp_path_factory):
    """Redis, 3 daphne replicas, gunicorn and nginx, up and healthy via `make up`;
    removed with `make down` (volumes included) whatever the tests did."""
    compose_stack = ComposeStack.create(tmp_path_factory.mktemp("compose"))
    started = time.monotonic()
    try:
        compose_stack.make("up", REPLICAS=3)
        compose_stack.up_seconds = time.monotonic() - started
        yield compose_stack
    finally:
        ids = compose_stack.containers(all_states=True)
        volumes = [
            m["Name"] for c in (docker_inspect(*ids) if ids else []) for m in c["Mounts"] if m["Type"] == "volume"
        ]
        compose_stack.make("down")
        left = compose_stack.leftovers()
        left += [
            f"volume {v}"
            for v in volumes
            if run(["docker", "volume", "ls", "--quiet", "--filter", f"name=^{v}$"], timeout=60).stdout.strip()
        ]
        assert not left, f"make down left behind: {left}"
