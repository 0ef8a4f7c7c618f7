"""The whole scaled topology on one machine, as local processes, no Docker.

redis-server (with a password), N Daphne replicas (POD_NAME daphne-1..N),
gunicorn and nginx rendered from nginx/nginx.conf.template, all on free
loopback ports. Started in dependency order and each waited on by its real
readiness (/readyz, /nginx-health); every process's output is streamed with a
``[name]`` prefix (nginx's access log only with LOG_ACCESS=1); leaving the
``with`` block stops them all, nothing left running. ``make demo`` and ``make
check-fanout`` run it through loadtest/demo.py.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from realtime import command_line

from deploy.ports import free_ports, port_is_free
from deploy.processes import ManagedProcess, stop_all
from deploy.redis_server import RedisServer
from deploy.render_nginx import render, values_for

REPO = Path(__file__).resolve().parent.parent
APP_DIR = REPO / "app"
CHANNEL_LAYERS = ("redis", "redis-pubsub", "redis-fanout", "memory")
# What `make demo` runs; compose and Kubernetes set the same (a test holds them together).
DEFAULT_CHANNEL_LAYER = "redis-fanout"
GUNICORN_POD_NAME = "gunicorn"
# nginx's access log lines (combined format), shown only with LOG_ACCESS=1.
NGINX_ACCESS_LINE = re.compile(r"\S+ - \S+ \[")
GUNICORN_WORKERS = 2
# A first start on a busy 2-core machine imports Django in N+3 processes at once.
STARTUP_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
# No proxy from the environment may sit between the runner and its own loopback servers.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """The stack could not start; the message names the process and why."""


def nginx_binary() -> str:
    # Debian installs nginx in /usr/sbin, which is not on a normal user's PATH.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise StackError("nginx is not installed: apt-get install nginx-light (`make system-packages` does it as root)")
    return found


def probe(url: str, timeout: float = 2.0) -> tuple[int | None, str]:
    """(HTTP status or None, body or error) of a GET."""
    try:
        with _HTTP.open(url, timeout=timeout) as response:
            return response.status, response.read(500).decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read(500).decode(errors="replace")
    except OSError as error:
        return None, repr(error)


class LocalStack:
    """Context manager: ``with LocalStack(replicas=3) as stack: ... stack.url ...``."""

    def __init__(
        self,
        replicas: int = 3,
        port: int | None = None,
        channel_layer: str = DEFAULT_CHANNEL_LAYER,
        env: dict[str, str] | None = None,
        log: TextIO | None = None,
        replica_command: Callable[[int], list[str]] | None = None,
        nginx_env: dict[str, str] | None = None,
    ):
        """``replica_command(port)``, when given, is the argv of a replica server to
        run instead of Daphne (the capacity benchmark's raw baseline): it must
        listen on 127.0.0.1:port and answer /readyz with its POD_NAME as Daphne does.
        ``nginx_env`` sets more of nginx's inputs (TLS, real-IP: the template's header)."""
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        if channel_layer not in CHANNEL_LAYERS:
            raise ValueError(f"channel_layer must be one of {', '.join(CHANNEL_LAYERS)}, got {channel_layer!r}")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be 1-65535, got {port}")
        self.log = log or sys.stderr
        self.channel_layer = channel_layer
        self.extra_env = dict(env or {})
        self.nginx_env = dict(nginx_env or {})
        self.replica_command = replica_command or self._daphne_argv
        self.replica_names = [f"daphne-{index}" for index in range(1, replicas + 1)]
        *replica_ports, self.gunicorn_port, redis_port, nginx_port = free_ports(replicas + 3)
        self.replica_ports = dict(zip(self.replica_names, replica_ports, strict=True))
        self.port = port or nginx_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.broadcast_token = self.extra_env.get("BROADCAST_TOKEN") or secrets.token_urlsafe(32)
        try:
            self.redis = RedisServer(port=redis_port, password=secrets.token_urlsafe(24), log=self.log)
        except RuntimeError as error:  # redis-server is not installed
            raise StackError(str(error)) from None
        self._workdir: Path | None = None
        self._processes: dict[str, ManagedProcess] = {}

    # --- lifecycle ---------------------------------------------------------

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        if not port_is_free(self.port):
            raise StackError(f"port {self.port} on 127.0.0.1 is in use: pick another with --port / PORT=")
        nginx = nginx_binary()
        self._workdir = Path(tempfile.mkdtemp(prefix="channels-stack-"))
        # nginx started as root runs its workers as nobody, who must reach the
        # temp directories nginx creates in here.
        self._workdir.chmod(0o711)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        self.redis.start()
        env = self._environment()
        self._collectstatic(env)

        for name, port in self.replica_ports.items():
            self._processes[name] = ManagedProcess(
                name, self.replica_command(port), env={**env, "POD_NAME": name}, cwd=APP_DIR, log=self.log
            )
        # gunicorn's workers add up their metrics through shared files.
        metrics_dir = self._workdir / "gunicorn-metrics"
        metrics_dir.mkdir()
        self._processes[GUNICORN_POD_NAME] = ManagedProcess(
            GUNICORN_POD_NAME,
            self._gunicorn_argv(),
            env={**env, "POD_NAME": GUNICORN_POD_NAME, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
            cwd=APP_DIR,
            log=self.log,
        )
        for process in self._processes.values():
            process.start()
        for name in [*self.replica_names, GUNICORN_POD_NAME]:
            self._wait_ready(name, self._readyz_url(name), deadline, pod=name)

        runtime = self._workdir / "nginx"
        runtime.mkdir(mode=0o711)
        config = runtime / "nginx.conf"
        config.write_text(self.nginx_config(runtime))
        self._processes["nginx"] = ManagedProcess(
            "nginx",
            [nginx, "-e", "stderr", "-p", str(runtime), "-c", str(config)],
            log=self.log,
            hide=None if command_line.access_log_on() else NGINX_ACCESS_LINE.match,
        )
        self._processes["nginx"].start()
        self._wait_ready("nginx", f"{self.url}/nginx-health", deadline)
        # Through nginx to gunicorn: the rendered upstreams really route.
        self._wait_ready("nginx", f"{self.url}/readyz", deadline)

    def stop(self) -> None:
        """Front door first, then the app servers, Redis last; idempotent."""
        nginx = self._processes.get("nginx")
        if nginx:
            nginx.stop(STOP_TIMEOUT)
        stop_all([p for name, p in self._processes.items() if name != "nginx"], STOP_TIMEOUT)
        self.redis.stop()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # --- what tests and the CLI use ------------------------------------------

    def kill_replica(self, name: str, sig: int = signal.SIGKILL, wait: bool = True) -> None:
        """Signal one Daphne replica; with ``wait``, return once it is gone
        (SIGKILL after the stop timeout if the signal did not end it)."""
        process = self._replica(name)
        process.signal_group(sig)
        if wait:
            process.finish(time.monotonic() + STOP_TIMEOUT)

    def start_replica(self, name: str) -> None:
        """Start a replica again on its old port and wait until it is ready."""
        process = self._replica(name)
        if process.running():
            raise StackError(f"{name} is still running (pid {process.pid}): kill_replica() it first")
        process.start()
        self._wait_ready(name, self._readyz_url(name), time.monotonic() + STARTUP_TIMEOUT, pod=name)

    def pids(self) -> list[int]:
        """Every live process of the stack, forked workers included."""
        pids = self.redis.pids()
        for process in self._processes.values():
            pids += process.pids()
        return pids

    @property
    def ports(self) -> dict[str, int]:
        return {
            "nginx": self.port,
            "redis": self.redis.port,
            GUNICORN_POD_NAME: self.gunicorn_port,
            **self.replica_ports,
        }

    def nginx_config(self, runtime_dir: Path) -> str:
        return render(
            values_for(
                port=self.port,
                runtime_dir=str(runtime_dir),
                daphne=[f"127.0.0.1:{port}" for port in self.replica_ports.values()],
                gunicorn=[f"127.0.0.1:{self.gunicorn_port}"],
                **self.nginx_env,
            )
        )

    # --- internals ----------------------------------------------------------

    def _replica(self, name: str) -> ManagedProcess:
        if name not in self.replica_names:
            raise ValueError(f"no replica {name!r}: the replicas are {', '.join(self.replica_names)}")
        return self._processes[name]

    def _readyz_url(self, name: str) -> str:
        port = self.gunicorn_port if name == GUNICORN_POD_NAME else self.replica_ports[name]
        return f"http://127.0.0.1:{port}/readyz"

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(APP_DIR), str(REPO)]),
                # Whatever the caller runs under (pytest sets tests.settings), the
                # servers run the production settings.
                "DJANGO_SETTINGS_MODULE": "config.settings",
                "DJANGO_DEBUG": "0",
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
                "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
                "DJANGO_STATIC_ROOT": str(self._workdir / "static"),
                "CHANNEL_LAYER": self.channel_layer,
                "REDIS_URL": self.redis.url,
                "BROADCAST_TOKEN": self.broadcast_token,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def _collectstatic(self, env: dict[str, str]) -> None:
        result = subprocess.run(
            [sys.executable, str(APP_DIR / "manage.py"), "collectstatic", "--noinput", "--verbosity", "0"],
            env=env,
            cwd=APP_DIR,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise StackError(f"collectstatic failed with code {result.returncode}:\n{result.stdout}{result.stderr}")

    @staticmethod
    def _daphne_argv(port: int) -> list[str]:
        # Daphne with the graceful drain (app/realtime/server.py), as in production.
        return command_line.argv(sys.executable, "127.0.0.1", port)

    def _gunicorn_argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{self.gunicorn_port}",
            "--workers",
            str(GUNICORN_WORKERS),
            # Its control socket lives at one path per user (~/.gunicorn):
            # stacks running side by side would take it from each other.
            "--no-control-socket",
            "--config",
            str(REPO / "deploy" / "gunicorn_conf.py"),
            "config.wsgi:application",
        ]

    def _wait_ready(self, name: str, url: str, deadline: float, pod: str | None = None) -> None:
        """Until ``url`` answers 200 (naming ``pod``, when given: another server
        that took the port must not pass for this one)."""
        process = self._processes[name]
        answer: tuple[int | None, str] = (None, "no answer yet")
        while time.monotonic() < deadline:
            if not process.running():
                raise StackError(
                    f"{name} exited with code {process.returncode} before it was ready (its output is above)"
                )
            answer = probe(url, timeout=1.0)
            if answer[0] == 200:
                if pod is None or json.loads(answer[1]).get("pod") == pod:
                    return
                raise StackError(f"{url} is answered by another server ({answer[1]!r}), not {name}: the port was taken")
            time.sleep(0.1)
        raise StackError(
            f"{name} was not ready at {url} within {STARTUP_TIMEOUT:.0f} s; last answer: {answer[0]} {answer[1]}"
        )
