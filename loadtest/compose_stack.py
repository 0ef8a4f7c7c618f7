"""A compose stack of the real images, driven like a user does: for the
end-to-end tests and the chaos suite.

Started and stopped with the Makefile's own targets (`make up`, `make scale`,
`make down`) under a unique project name, on a free port, with its own env
file, so it never touches a developer's stack or .env. Containers are found by
the labels both docker-compose v1 and v2 put on them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy.ports import free_port

REPO = Path(__file__).resolve().parents[1]
APP_IMAGE = "channels-blueprint:0.1.0"
NGINX_APP_IMAGE = "channels-blueprint-nginx:0.1.0"
LOADTEST_IMAGE = "channels-blueprint-loadtest:0.1.0"
# Output kept from a failed command, enough for a build or start error.
FAILURE_TAIL = 4000


def compose_command() -> list[str] | None:
    """The compose the Makefile picks: the v2 plugin when it answers, else docker-compose v1."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


COMPOSE_FILE = REPO / "docker-compose.yml"
# ${NAME}, ${NAME:-default}, ${NAME-default}; $${...} is an escaped literal for the container's shell.
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)(?::?-([^}]*))?\}")


def compose_variables() -> dict[str, str]:
    """Every variable docker-compose.yml reads, with its default ('' when none)."""
    defaults: dict[str, str] = {}
    for name, default in COMPOSE_VARIABLE.findall(COMPOSE_FILE.read_text()):
        assert defaults.get(name, default) == default, f"{name} has two defaults in docker-compose.yml"
        defaults[name] = default
    return defaults


def stack_environment() -> dict[str, str]:
    """This process's environment minus what compose would take from it: the
    shell beats the env file in compose, and the test settings export
    CHANNEL_LAYER=memory and test secrets that must not reach the containers."""
    return {name: value for name, value in os.environ.items() if name not in compose_variables()}


def run(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with the tail of its output."""
    result = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False, env=stack_environment(), **kwargs
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-FAILURE_TAIL:]
        raise RuntimeError(f"{' '.join(args)} exited with {result.returncode}:\n{output}")
    return result


def make(*targets: str, timeout: float = 900, **variables: object) -> subprocess.CompletedProcess:
    return run(["make", "--no-print-directory", *targets, *(f"{k}={v}" for k, v in variables.items())], timeout)


def docker_inspect(*ids: str) -> list[dict]:
    return json.loads(run(["docker", "inspect", *ids], timeout=60).stdout)


def image_size_mb(image: str) -> float:
    return docker_inspect(image)[0]["Size"] / 1e6


def replica_name(container: dict) -> str:
    """``<service>-<number>``, the name a replica takes under compose, from docker inspect."""
    labels = container["Config"]["Labels"]
    return f"{labels['com.docker.compose.service']}-{labels['com.docker.compose.container-number']}"


@dataclass
class ComposeStack:
    project: str
    env_file: Path
    port: int
    broadcast_token: str
    # Compose files, the base first, then overlays (docker-compose.sentinel.yml).
    files: tuple[str, ...] = ("docker-compose.yml",)
    up_seconds: float = 0.0

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        files: tuple[str, ...] = ("docker-compose.yml",),
        prefix: str = "e2e",
        environment: dict[str, object] | None = None,
    ) -> ComposeStack:
        """A stack definition with fresh secrets, a free port and any other
        variables of docker-compose.yml; nothing is started yet."""
        token = secrets.token_hex(16)
        port = free_port()
        env_file = directory / "stack.env"
        variables = {
            "DJANGO_SECRET_KEY": secrets.token_hex(32),
            "REDIS_PASSWORD": secrets.token_hex(16),
            "BROADCAST_TOKEN": token,
            "NGINX_PORT": port,
            "LOCUST_PORT": free_port(),  # the loadtest profile's web UI, if started
            **(environment or {}),
        }
        env_file.write_text("".join(f"{name}={value}\n" for name, value in variables.items()))
        return cls(f"{prefix}{secrets.token_hex(4)}", env_file, port, token, files)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def make(self, *targets: str, **variables: object) -> subprocess.CompletedProcess:
        return make(
            *targets, PROJECT=self.project, ENV_FILE=self.env_file, COMPOSE_FILES=" ".join(self.files), **variables
        )

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = compose_command()
        assert command, "no compose command"
        files = [arg for name in self.files for arg in ("--file", name)]
        return run([*command, *files, "--project-name", self.project, "--env-file", str(self.env_file), *args], timeout)

    def containers(self, service: str | None = None, *, all_states: bool = False) -> list[str]:
        """Container ids of the project (of one service), running ones unless all_states."""
        args = ["docker", "ps", "--quiet", "--no-trunc", "--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            args.append("--all")
        return run(args, timeout=60).stdout.split()

    def one(self, service: str) -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"expected one {service} container, found {len(ids)}"
        return ids[0]

    def hostnames(self, service: str = "daphne") -> dict[str, str]:
        """The replica's name (its POD_NAME: ``daphne-2``, deploy/replica_name.py)
        -> container id, for the running containers."""
        ids = self.containers(service)
        return {replica_name(c): c["Id"] for c in docker_inspect(*ids)} if ids else {}

    def inspect(self, container: str) -> dict:
        return docker_inspect(container)[0]

    def host_pid(self, container: str) -> int:
        """The container's main process as this machine sees it (0: not running)."""
        return int(self.inspect(container)["State"]["Pid"])

    def address(self, container: str) -> str:
        """The container's address on the project's network."""
        networks = self.inspect(container)["NetworkSettings"]["Networks"]
        return next(iter(networks.values()))["IPAddress"]

    def exec(self, container: str, *command: str, timeout: float = 60) -> str:
        return run(["docker", "exec", container, *command], timeout).stdout

    def leftovers(self) -> list[str]:
        """Whatever of the project still exists: containers, networks, volumes."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind, args in (
            ("container", ["docker", "ps", "--all", "--quiet", "--filter", label]),
            ("network", ["docker", "network", "ls", "--quiet", "--filter", label]),
            ("volume", ["docker", "volume", "ls", "--quiet", "--filter", label]),
        ):
            found += [f"{kind} {name}" for name in run(args, timeout=60).stdout.split()]
        return found
