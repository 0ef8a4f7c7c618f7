"""Wait until containers report healthy: what `make up` and `make scale` wait on.

Polls Docker's own health status (each service's healthcheck), so readiness is
the real check, never a sleep. A container that exits or turns unhealthy ends
the wait at once with its last log lines.

    python -m deploy.compose_health --timeout 180 CONTAINER_ID...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

POLL_SECONDS = 0.5
LOG_LINES = 30


class NotHealthy(Exception):
    """A container exited, turned unhealthy, or was not healthy in time."""


def inspect(container_ids: list[str]) -> list[dict]:
    result = subprocess.run(["docker", "inspect", *container_ids], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NotHealthy(f"docker inspect failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def health_of(container: dict) -> str:
    """healthy | starting | unhealthy | exited | running (no healthcheck)."""
    state = container["State"]
    if state["Status"] != "running":
        # A crash loop under a restart policy counts as exited, not as starting.
        return "exited" if state["Status"] in ("exited", "dead", "restarting") else state["Status"]
    return state.get("Health", {}).get("Status", "running")


def last_logs(container_id: str) -> str:
    result = subprocess.run(
        ["docker", "logs", "--tail", str(LOG_LINES), container_id], capture_output=True, text=True, check=False
    )
    return (result.stdout + result.stderr).strip()


def wait_healthy(container_ids: list[str], timeout: float, report=print) -> None:
    """Return once every container is healthy; raise NotHealthy otherwise."""
    if not container_ids:
        raise NotHealthy("no containers to wait for (is the stack up?)")
    deadline = time.monotonic() + timeout
    last_summary = ""
    while True:
        containers = inspect(container_ids)
        status = {c["Name"].lstrip("/"): health_of(c) for c in containers}
        for container in containers:
            if health_of(container) in ("exited", "unhealthy"):
                name = container["Name"].lstrip("/")
                raise NotHealthy(
                    f"{name} is {health_of(container)} (exit code {container['State']['ExitCode']});"
                    f" its last log lines:\n{last_logs(container['Id'])}"
                )
        waiting = sorted(name for name, health in status.items() if health not in ("healthy", "running"))
        if not waiting:
            return
        summary = f"waiting for {', '.join(waiting)}"
        if summary != last_summary:
            report(summary)
            last_summary = summary
        if time.monotonic() > deadline:
            raise NotHealthy(f"not healthy after {timeout:.0f} s: " + ", ".join(f"{n} {status[n]}" for n in waiting))
        time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait at most (default 180)")
    parser.add_argument("containers", nargs="*", help="container ids or names")
    args = parser.parse_args(argv)
    try:
        wait_healthy(args.containers, args.timeout, report=lambda line: print(line, file=sys.stderr))
    except NotHealthy as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
