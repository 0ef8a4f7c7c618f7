"""Run one command against a fresh local stack, then stop the stack.

    python -m loadtest.with_stack --replicas 3 --log loadtest/reports/stack.log -- \
        locust -f loadtest/locustfile.py --headless ... FanoutUser

The command gets the stack's entry point as ``LOCUST_HOST`` and its broadcast
token as ``BROADCAST_TOKEN``; its exit code is ours. The stack's own output
(nginx logs one line per request) goes to ``--log`` so it does not bury the
load test's summary.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from deploy.stack import LocalStack, StackError


def _exit_on_signal(signum, frame):
    # Unwinds through the ``with``: the stack's processes live in their own
    # sessions, so nobody else would stop them.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3, help="Daphne replicas (default 3)")
    parser.add_argument("--log", help="file for the stack's output (default: stderr)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to run after --")
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    # Closed in the finally below, after the stack (which writes to it) has stopped.
    log = open(args.log, "w") if args.log else sys.stderr  # noqa: SIM115
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    try:
        with LocalStack(replicas=args.replicas, log=log) as stack:
            where = f" (its log: {args.log})" if args.log else ""
            print(f"local stack: {args.replicas} replicas behind {stack.url}{where}", file=sys.stderr, flush=True)
            env = {**os.environ, "LOCUST_HOST": stack.url, "BROADCAST_TOKEN": stack.broadcast_token}
            child = subprocess.Popen(command, env=env)
            try:
                return child.wait()
            except KeyboardInterrupt:
                # The terminal's Ctrl-C reached the child too: let it write its report.
                return child.wait()
            finally:
                if child.poll() is None:
                    child.terminate()
                    child.wait()
    except KeyboardInterrupt:
        return 130
    except StackError as error:
        where = f" (its output: {args.log})" if args.log else ""
        print(f"the local stack failed to start: {error}{where}", file=sys.stderr)
        return 1
    finally:
        if log is not sys.stderr:
            log.close()


if __name__ == "__main__":
    sys.exit(main())
