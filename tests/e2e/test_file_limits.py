"""Open-file limits in the containers: every socket is a file.

Some runtimes start containers with a soft limit of 1,024 under a far higher
hard one (containerd 2.0, Docker 25 and later); both images' entrypoints
raise the soft limit to the hard one. The proof: a Daphne replica started on
the stack's network with a soft limit of 1,024, as such a runtime would,
holds more than 1,024 sockets.
"""

from __future__ import annotations

import asyncio
import re
import resource
import time
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect

from loadtest.compose_stack import APP_IMAGE, ComposeStack, run

SOFT, HARD = 1024, 8192
SOCKETS = 1100
NGINX_WORKER_LIMIT = int(
    re.search(
        r"^worker_rlimit_nofile\s+(\d+);",
        (Path(__file__).parents[2] / "nginx" / "nginx.conf.template").read_text(),
        re.M,
    ).group(1)
)


def open_files_limit(limits: str) -> tuple[str, str]:
    """(soft, hard) from a /proc/<pid>/limits text."""
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return soft, hard


def host_limits(pid: int) -> tuple[str, str]:
    return open_files_limit(Path(f"/proc/{pid}/limits").read_text())


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_the_stacks_servers_run_with_the_soft_limit_at_the_hard_one(stack: ComposeStack):
    daphne = stack.host_pid(next(iter(stack.hostnames().values())))
    soft, hard = host_limits(daphne)
    assert soft == hard, f"daphne: soft {soft}, hard {hard}"
    master = stack.host_pid(stack.one("nginx"))
    soft, hard = host_limits(master)
    assert soft == hard, f"nginx master: soft {soft}, hard {hard}"
    workers = children(master)
    assert workers, "nginx has no worker processes"
    for worker in workers:
        soft, _ = host_limits(worker)
        assert int(soft) == min(NGINX_WORKER_LIMIT, int(hard)), f"nginx worker {worker}: soft {soft}"


def _start_low_limit_replica(stack: ComposeStack, name: str) -> str:
    """A Daphne replica like the stack's, on its network, started with a soft limit of 1,024."""
    template = stack.inspect(next(iter(stack.hostnames().values())))
    network = next(iter(template["NetworkSettings"]["Networks"]))
    environment = [e for e in template["Config"]["Env"] if not e.startswith(("HOSTNAME=", "PATH=", "REBALANCE="))]
    # Without rebalancing: this replica holds every socket of the test on
    # purpose, which the census would soon call far above the deployment's
    # mean and refuse more of with 503 (README, Rebalancing).
    environment.append("REBALANCE=0")
    run(
        [
            "docker",
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            network,
            "--ulimit",
            f"nofile={SOFT}:{HARD}",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges:true",
            *[arg for e in environment for arg in ("--env", e)],
            APP_IMAGE,
            "daphne",
        ],
        timeout=60,
    ).check_returncode()
    return stack.address(name)


def _wait_healthy(address: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}:8000/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the low-limit replica never answered /healthz"
        time.sleep(0.5)


async def _hold_sockets(address: str, count: int) -> None:
    url, origin = f"ws://{address}:8000/ws/echo/", "http://127.0.0.1"
    sockets = []
    try:
        for start in range(0, count, 100):
            batch = [
                connect(url, origin=origin, open_timeout=20, ping_interval=None, proxy=None)
                for _ in range(min(100, count - start))
            ]
            sockets += await asyncio.gather(*batch)
        # Every socket is open and served: the first and the last still echo.
        for ws in (sockets[0], sockets[-1]):
            await ws.send('{"message": "still here"}')
            assert "still here" in await asyncio.wait_for(ws.recv(), 10)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


def test_a_replica_started_at_1024_open_files_holds_more_sockets(stack: ComposeStack):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SOCKETS + 200:  # this process holds the client ends
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * SOCKETS), hard))
    name = f"{stack.project}-low-file-limit"
    try:
        address = _start_low_limit_replica(stack, name)
        _wait_healthy(address)
        pid = stack.host_pid(name)
        assert host_limits(pid) == (str(HARD), str(HARD)), "the entrypoint did not raise the soft limit"
        asyncio.run(_hold_sockets(address, SOCKETS))
    finally:
        run(["docker", "rm", "--force", name], timeout=60)
