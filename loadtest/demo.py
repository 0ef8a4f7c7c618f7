"""The local stack with the fan-out check: what `make demo` and `make check-fanout` run.

    python -m loadtest.demo --check            # start, run the fan-out check, exit with its verdict
    python -m loadtest.demo --check --serve    # ... then serve until Ctrl-C (make demo), which exits 0
    python -m loadtest.demo --serve            # no check

What a person needs comes last and stands apart: the check's verdict, the
chat URL and the `curl` line of the HTTP API. nginx's and Daphne's access
logs are shown only with LOG_ACCESS=1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from deploy.stack import CHANNEL_LAYERS, DEFAULT_CHANNEL_LAYER, LocalStack, StackError
from loadtest.fanout_check import run_fanout_check

RULE = "=" * 72


def _stop_on_signal(signum, frame):
    # One orderly shutdown: further Ctrl-C / SIGTERM cannot cut it short
    # (it is bounded by the stack's stop timeout, then SIGKILL).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def front_door(stack: LocalStack, verdict: str | None) -> str:
    lines = [RULE]
    if verdict:
        lines.append(f"fan-out check: {verdict}")
    lines += [
        f"chat:          open {stack.url}/chat/lobby/ in two tabs (each names the replica serving it)",
        f"broadcast API: curl -H 'Authorization: Bearer {stack.broadcast_token}' "
        f'-d \'{{"message": "hello"}}\' {stack.url}/api/rooms/lobby/messages',
        "serving until Ctrl-C" + ("" if os.environ.get("LOG_ACCESS") == "1" else " (LOG_ACCESS=1 shows every request)"),
        RULE,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3, help="Daphne replicas (default 3)")
    parser.add_argument("--port", type=int, help="nginx port (default: a free one)")
    parser.add_argument("--channel-layer", default=DEFAULT_CHANNEL_LAYER, choices=CHANNEL_LAYERS)
    parser.add_argument("--check", action="store_true", help="run the fan-out check once the stack is ready")
    parser.add_argument("--serve", action="store_true", help="after the check, keep serving until Ctrl-C")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    serve = args.serve or not args.check

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    # A fixed token from the caller's environment, so a demo can be scripted.
    env = {name: os.environ[name] for name in ("BROADCAST_TOKEN",) if os.environ.get(name)}
    verdict = 0
    try:
        with LocalStack(replicas=args.replicas, port=args.port, channel_layer=args.channel_layer, env=env) as stack:
            print(f"nginx listening on {stack.url}", flush=True)
            said = None
            if args.check:
                report = asyncio.run(
                    run_fanout_check(
                        stack.url,
                        # Every room needs a member on every replica.
                        clients_per_room=max(10, args.replicas),
                        expect_replicas=args.replicas,
                        broadcast_token=stack.broadcast_token,
                    )
                )
                print(report.render(), flush=True)
                verdict = 0 if report.ok else 1
                said = next(line for line in report.render().splitlines() if line.startswith("verdict: "))[9:]
            if serve:
                print(front_door(stack, said), flush=True)
                while True:
                    signal.pause()
    except KeyboardInterrupt:
        # Ctrl-C is how a demo ends: a success unless its check failed.
        print("stopped: every process of the stack has exited", flush=True)
        return verdict
    except StackError as error:
        print(f"stack failed to start: {error}", file=sys.stderr, flush=True)
        return 1
    return verdict


if __name__ == "__main__":
    sys.exit(main())
