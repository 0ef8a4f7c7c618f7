"""The idle phase's generator, split over processes, each holding what its open-file limit allows.

One process holds one file per socket, and a host can cap that below the
idle phase's sockets (a hard limit of 20,000 here, against 50,000 sockets):
``scale.idle`` gives each worker process one replica's share of the sockets,
or part of it when a share does not fit one process. Workers are started with
``multiprocessing``'s spawn (a fresh interpreter, no copy of the parent's
event loop or stack) and spoken to over a pipe each.

A worker opens its share in room ``idle`` (the same room for all of them, so
one publish reaches every member), says ``opened`` and waits. For the
broadcast, every worker but one is told to owe the message to its own
members, and answers ``owed``; then the one left publishes it, owed to its
own share, and answers ``sent`` with the time it sent it. Each waits for its
members' deliveries and reports them with its last arrival. Both times are
read from CLOCK_MONOTONIC, which every process on the host shares, so the
parent takes the time to the last delivery as one subtraction.

A worker stops by itself: its sockets open within ``OPEN_LIMIT_SECONDS``,
the parent's next word comes within ``PARENT_LIMIT_SECONDS``, deliveries
are awaited for at most the broadcast limit, and whenever its pipe closes
(the parent is gone, even killed) it stops at once. The parent terminates
any worker still running when it leaves, whether or not it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from loadtest.bench.loadgen import ConnectError, Fleet

ROOM = "idle"
# The longest one worker may take to open its share (about 17,000 handshakes on a shared 2-core host).
OPEN_LIMIT_SECONDS = 600.0
# The parent's next word comes once every worker opened and the replicas' memory was read.
PARENT_LIMIT_SECONDS = OPEN_LIMIT_SECONDS + 60.0
# A worker's own start (a fresh interpreter importing the generator), before it opens anything.
START_LIMIT_SECONDS = 60.0
# After the broadcast: the worker closes its sockets (bounded by the fleet's timeout) and exits.
EXIT_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class Assignment:
    """What one worker holds: ``sockets`` members of room ``idle`` on the replica at ``url``."""

    name: str
    url: str
    sockets: int
    wire: str
    configuration: str
    concurrency: int
    timeout: float
    broadcast_limit: float


class WorkerError(RuntimeError):
    """A worker failed, died or fell silent; the message names it."""


def work(pipe: Connection, assignment: Assignment) -> None:
    """A worker process's entry point: its failure is told to the parent, which names it."""
    try:
        asyncio.run(serve(pipe, assignment))
    except asyncio.CancelledError:
        pass  # the parent is gone (Parent cancelled the worker): nothing is waiting for it
    except BaseException as error:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            pipe.send(("failed", type(error).__name__, str(error) or repr(error)))


class Parent:
    """The worker's pipe to the parent, read by the event loop whatever the worker awaits:
    orders queue up, and the pipe's end (the parent gone, even killed) cancels ``task``."""

    def __init__(self, pipe: Connection, task: asyncio.Task):
        self.pipe = pipe
        self.task = task
        self.orders: asyncio.Queue[tuple] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(pipe.fileno(), self._read)

    def _read(self) -> None:
        try:
            self.orders.put_nowait(self.pipe.recv())
        except EOFError:
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            self.task.cancel()

    async def next(self, timeout: float) -> tuple:
        return await asyncio.wait_for(self.orders.get(), timeout)

    def say(self, *message) -> None:
        self.pipe.send(message)


async def serve(pipe: Connection, assignment: Assignment) -> None:
    parent = Parent(pipe, asyncio.current_task())
    fleet = Fleet(
        assignment.url,
        assignment.wire,
        assignment.configuration,
        concurrency=assignment.concurrency,
        timeout=assignment.timeout,
    )
    started = time.monotonic()
    await asyncio.wait_for(fleet.open(ROOM, assignment.sockets), OPEN_LIMIT_SECONDS)
    parent.say("opened", started, time.monotonic())
    order, message_id = await parent.next(PARENT_LIMIT_SECONDS)
    ledger = fleet.measure()
    if order == "publish":
        members = fleet.rooms[ROOM]
        # From a socket still open, if any is: one the server closed would measure nothing at all.
        publisher = next((member for member in members if member.client.open), members[0])
        parent.say("sent", publisher.publish(message_id, owed=assignment.sockets))
    else:
        # Owed before the publish: a delivery of an id the ledger does not know is not counted.
        ledger.owe(message_id, assignment.sockets, time.monotonic())
        parent.say("owed", None)
    await fleet.settle(time.monotonic() + assignment.broadcast_limit)
    delivered = {
        "received": ledger.received,
        "outstanding": ledger.outstanding,
        "duplicates": ledger.duplicates,
        "last_arrival": ledger.last_arrival if ledger.received else None,
        "errors": dict(fleet.errors),
        "lost_sockets": dict(fleet.lost_sockets),
    }
    parent.say("delivered", delivered)
    # Only on the way out in good order: a worker that failed exits at once and its sockets close with it.
    await fleet.close()


@dataclass
class Worker:
    assignment: Assignment
    process: multiprocessing.process.BaseProcess
    pipe: Connection


class Workers:
    """The parent's side: ``with Workers(assignments) as workers:`` starts them and
    ends them on the way out, terminating any that did not exit by itself."""

    def __init__(self, assignments: list[Assignment]):
        self.assignments = assignments
        self.all: list[Worker] = []

    def __enter__(self) -> Workers:
        context = multiprocessing.get_context("spawn")
        try:
            for assignment in self.assignments:
                ours, theirs = context.Pipe()
                process = context.Process(target=work, args=(theirs, assignment), name=assignment.name, daemon=True)
                process.start()
                theirs.close()  # only the worker holds its end: the parent's recv sees its exit as EOF
                self.all.append(Worker(assignment, process, ours))
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.stop(grace=0 if exc_type else max(a.timeout for a in self.assignments) + EXIT_GRACE_SECONDS)

    def tell(self, worker: Worker, order: str, message_id: int) -> None:
        worker.pipe.send((order, message_id))

    def expect(self, workers: list[Worker], kind: str, timeout: float) -> dict[str, tuple]:
        """Each worker's message ``kind`` (its arguments, by worker name), within ``timeout`` seconds;
        a worker that failed, died, said something else or stayed silent is a WorkerError naming it
        (a ConnectError when its sockets would not open)."""
        deadline = time.monotonic() + timeout
        waiting = {worker.pipe: worker for worker in workers}
        said: dict[str, tuple] = {}
        while waiting:
            left = deadline - time.monotonic()
            ready = wait([*waiting, *(worker.process.sentinel for worker in waiting.values())], max(left, 0))
            if not ready and left <= 0:
                names = ", ".join(worker.assignment.name for worker in waiting.values())
                raise WorkerError(f"{names}: no {kind!r} within {timeout:g} s")
            for pipe, worker in list(waiting.items()):
                if pipe in ready or worker.process.sentinel in ready:
                    said[worker.assignment.name] = self._read(worker, kind)
                    del waiting[pipe]
        return said

    @staticmethod
    def _read(worker: Worker, kind: str) -> tuple:
        name = worker.assignment.name
        try:
            message = worker.pipe.recv()
        except EOFError:
            worker.process.join(1)
            raise WorkerError(f"{name} exited (code {worker.process.exitcode}) before it said {kind!r}") from None
        if message[0] == "failed":
            _, error, text = message
            raise (ConnectError if error == ConnectError.__name__ else WorkerError)(f"{name}: {error}: {text}")
        if message[0] != kind:
            raise WorkerError(f"{name} said {message[0]!r}, not {kind!r}")
        return message[1:]

    def stop(self, grace: float) -> None:
        """Wait ``grace`` seconds in all for the workers to exit, then terminate (and at last kill) the rest."""
        deadline = time.monotonic() + grace
        for worker in self.all:
            worker.process.join(max(deadline - time.monotonic(), 0))
        for worker in self.all:
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.pipe.close()
        self.all.clear()
