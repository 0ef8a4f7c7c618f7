"""The blueprint's Daphne replica (``realtime.server``, same CLI) on a uvloop event loop.

    python -m loadtest.bench.uvloop_replica -b 127.0.0.1 -p 8000 config.asgi:application

Daphne creates its event loop when ``daphne.server`` is imported and installs
Twisted's asyncio reactor on it; setting the loop policy first puts that
reactor, and every consumer, on uvloop. The benchmark measures this as its
own configuration; the app would adopt it with the same two lines at the top
of ``realtime/server.py``.
"""
import asyncio

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

from realtime.server import DrainingCommandLine  # noqa: E402 (the policy must come first)

if __name__ == "__main__":
    DrainingCommandLine.entrypoint()
