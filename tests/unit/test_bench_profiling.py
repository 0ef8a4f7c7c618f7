"""How the profiles charge a sample or an allocation to the code it was spent for."""

import tracemalloc

from loadtest.bench import profiling

TWISTED_READ = "Connection.doRead (twisted/internet/tcp.py:248)"
AUTOBAHN_FRAME = "WebSocketServerProtocol._dataReceived (autobahn/websocket/protocol.py:1229)"
JSON_DUMPS = "dumps (json/__init__.py:231)"
JSON_C = "encoder_listencode_dict (_json.c:1522)"
SEND = "send (libc.so.6)"
LOOP = "BaseEventLoop._run_once (asyncio/base_events.py:1922)"
CONSUMER = "ChatConsumer.send_frame (realtime/consumers.py:427)"


def test_owner_names_libraries_our_code_the_stdlib_the_interpreter_and_libc():
    assert profiling.owner(TWISTED_READ) == "twisted"
    assert profiling.owner(CONSUMER) == "the blueprint (app/realtime)"
    assert profiling.owner(JSON_DUMPS) == "stdlib:json"
    assert profiling.owner("_run_module_as_main (<frozen runpy>:198)") == "stdlib:runpy"
    assert profiling.owner(LOOP) == "asyncio event loop"
    assert profiling.owner("EpollSelector.select (selectors.py:468)") == "asyncio event loop"
    assert profiling.owner(JSON_C) == profiling.INTERPRETER
    assert profiling.owner("_PyEval_EvalFrameDefault (libpython3.11.so.1.0)") == profiling.INTERPRETER
    assert profiling.owner(SEND) == profiling.SYSTEM
    assert profiling.owner("0x7fa69f44524a (libc.so.6)") == profiling.SYSTEM
    # Native libraries by the package that ships them.
    assert profiling.owner("0x7f00 (picows.cpython-311-x86_64-linux-gnu.so)") == "picows"
    assert profiling.owner("Loop__new_future (loop.cpython-311-x86_64-linux-gnu.so)") == "uvloop"
    assert profiling.owner("0x7f00 (_json.cpython-311-x86_64-linux-gnu.so)") == "stdlib:json"


def test_a_sample_is_charged_to_the_innermost_library_that_asked_for_the_work():
    # json.dumps in C, called by our consumer, under Twisted: our consumer's time.
    assert profiling.charged([LOOP, TWISTED_READ, AUTOBAHN_FRAME, CONSUMER, JSON_DUMPS, JSON_C]) == (
        "the blueprint (app/realtime)"
    )
    # A socket's send() is a bucket of its own, whoever made it.
    assert profiling.charged([LOOP, TWISTED_READ, AUTOBAHN_FRAME, SEND]) == profiling.SOCKET_SYSCALLS
    # Any other syscall is charged to its caller.
    assert profiling.charged([LOOP, TWISTED_READ, "getpid (libc.so.6)"]) == "twisted"
    # The event loop's own work is the event loop's, not the caller of run_forever's.
    assert profiling.charged(["Server.run (daphne/server.py:155)", LOOP, "getpid (libc.so.6)"]) == (
        "asyncio event loop"
    )
    # Nothing but the interpreter and libc: charged as it is.
    assert profiling.charged(["0x7fa6 (libc.so.6)", "_PyEval_EvalFrameDefault (libpython3.11.so.1.0)"]) == (
        profiling.INTERPRETER
    )


def test_folded_stacks_without_the_waiting_threads_give_the_shares(tmp_path):
    folded = tmp_path / "replica.folded"
    folded.write_text(
        f"{LOOP};{TWISTED_READ};{AUTOBAHN_FRAME};{SEND} 6\n"
        f"{LOOP};{CONSUMER};{JSON_DUMPS};{JSON_C} 2\n"
        f"{LOOP};EpollSelector.select (selectors.py:468);epoll_wait (libc.so.6) 90\n"
        f"{LOOP};pthread_cond_timedwait (libc.so.6) 5\n"
        # A pool thread blocked on its queue, the innermost frames without symbols.
        "Thread.run (threading.py:975);_queue_SimpleQueue_get_impl (_queuemodule.c:223);"
        "PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x7fec262aed90 (libc.so.6);0x7fec262a3f16 (libc.so.6) 40\n"
    )
    stacks = profiling.read_folded(folded)
    assert sum(count for _, count in stacks) == 8  # the 135 samples of waiting threads are not CPU
    shares = profiling.cpu_shares(stacks)
    assert shares["samples"] == 8
    assert shares["by_library"] == {profiling.SOCKET_SYSCALLS: 0.75, "the blueprint (app/realtime)": 0.25}
    assert shares["by_innermost"] == {profiling.SYSTEM: 0.75, profiling.INTERPRETER: 0.25}
    assert shares["top_functions"] == {SEND: 0.75, JSON_C: 0.25}


def _allocate(keep: list, count: int) -> None:
    keep.extend(bytearray(1000) for _ in range(count))


def test_memory_shares_are_the_bytes_per_socket_the_sockets_added_by_the_line_that_allocated():
    keep: list = []
    tracemalloc.start(8)
    try:
        before = tracemalloc.take_snapshot()
        _allocate(keep, 200)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    shares = profiling.memory_shares(before, after, sockets=100)
    # 200 blocks of about 1 KiB over 100 "sockets": about 2 KiB each, charged to this test module's line.
    assert 2000 <= shares["python_bytes_per_socket"] < 2600
    line, size = next(iter(shares["bytes_per_socket_by_line"].items()))
    assert "test_bench_profiling.py" in line and size >= 2000
