"""The images themselves: built offline, non-root, nothing but the app inside,
and an nginx that will not start half-configured."""

from __future__ import annotations

import subprocess

import pytest

from loadtest.compose_stack import APP_IMAGE, LOADTEST_IMAGE, NGINX_APP_IMAGE, docker_inspect

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]
SECRET_NAMES = ("DJANGO_SECRET_KEY", "REDIS_PASSWORD", "BROADCAST_TOKEN")
# What the app image holds under /app: the .dockerignore whitelist, nothing
# else; the load-test image adds loadtest/.
APP_CONTENTS = {"app", "deploy", "static"}
# About 350 MB and 130 MB when written (Debian base images); well past that
# means something that should stay out (the wheelhouse, a build tool) got in.
MAX_SIZE_MB = {APP_IMAGE: 500, LOADTEST_IMAGE: 600, NGINX_APP_IMAGE: 200}


def test_build_time_and_image_sizes(offline_images, capsys):
    with capsys.disabled():
        print(f"\nmake images-offline took {offline_images['build_seconds']:.0f} s")
        for image, size in offline_images["sizes_mb"].items():
            print(f"  {image}: {size:.0f} MB")
    for image, limit in MAX_SIZE_MB.items():
        assert offline_images["sizes_mb"][image] < limit, f"{image} grew past {limit} MB"


@pytest.mark.parametrize("image", [APP_IMAGE, LOADTEST_IMAGE, NGINX_APP_IMAGE])
def test_images_run_as_non_root_and_carry_no_secrets(offline_images, image):
    config = docker_inspect(image)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert not [e for e in config["Env"] if e.split("=", 1)[0] in SECRET_NAMES]
    uid = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", image, "-u"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert uid == "10001"


def test_app_image_holds_only_the_app_and_no_load_test_code(offline_images):
    listing = subprocess.run(
        ["docker", "run", "--rm", APP_IMAGE, "ls", "-A", "/app"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(listing) == APP_CONTENTS
    locust = subprocess.run(
        ["docker", "run", "--rm", APP_IMAGE, "python", "-c", "import locust"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert locust.returncode != 0 and "No module named 'locust'" in locust.stderr


def test_loadtest_image_runs_locust_with_the_scenarios(offline_images):
    listing = subprocess.run(
        ["docker", "run", "--rm", LOADTEST_IMAGE, "ls", "-A", "/app"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(listing) == APP_CONTENTS | {"loadtest"}
    locust = subprocess.run(
        ["docker", "run", "--rm", LOADTEST_IMAGE, "locust", "-f", "loadtest/locustfile.py", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert locust.returncode == 0 and "locust" in (locust.stdout + locust.stderr).lower(), locust.stderr


def test_app_image_roles_are_chosen_by_command(offline_images):
    check = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--read-only",
            "-e",
            f"DJANGO_SECRET_KEY={'x' * 50}",
            "-e",
            "DJANGO_ALLOWED_HOSTS=localhost",
            APP_IMAGE,
            "manage",
            "check",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "no issues" in check.stdout


@pytest.mark.parametrize(
    "unset, complaint",
    [("DAPHNE_DNS_NAME", "set DAPHNE_DNS_NAME"), ("GUNICORN_ADDRESSES", "unset variables: GUNICORN")],
)
def test_nginx_refuses_to_start_without_its_pools(offline_images, unset, complaint):
    values = {"DAPHNE_DNS_NAME": "daphne:8000", "GUNICORN_ADDRESSES": "127.0.0.1:8001"}
    del values[unset]
    env = [arg for name, value in values.items() for arg in ("-e", f"{name}={value}")]
    result = subprocess.run(
        ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", *env, NGINX_APP_IMAGE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert complaint in result.stderr
