"""A TCP proxy for fault injection: ``python -m tests.tcp_proxy <listen port> <target port>``,
and ``Proxy``, which runs it for a test.

Stopped with SIGSTOP it forwards nothing and closes nothing: packets are
neither answered nor refused, as in a network cut that drops them, and
SIGCONT heals it. Bound to loopback; runs until killed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def main(listen: int, target: int) -> None:
    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


class Proxy:
    """This proxy as a process in front of ``target``: ``cut()`` stops it, ``heal()`` resumes it."""

    def __init__(self, target: int):
        from deploy.ports import free_port

        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.tcp_proxy", str(self.port), str(target)], cwd=REPO, stdout=subprocess.PIPE
        )
        assert self.process.stdout.readline().strip() == b"listening"

    def cut(self):
        self.process.send_signal(signal.SIGSTOP)

    def heal(self):
        self.process.send_signal(signal.SIGCONT)

    def close(self):
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
