"""The process that holds a detached container (`minictr run -d`), so that it outlives the
command that started it: a ContainerRuntime of its own, the container's output in log files
(each line's time beside them),
and a Unix socket (`control` in its state directory) through which later `minictr stop`,
`kill`, `exec` and `stats` commands reach it. It records the container's end and exits.

Started by the CLI as `python -m pytest_minictr.cli.detached.shim`, in a session of its own,
with its order (one JSON object) on stdin; it answers one JSON line on stdout (started, or why
not) and then lets go of stdout, which tells the CLI to return. Killing the shim kills its
container (its launcher dies with it, and the containers with the launcher).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from pytest_minictr import protocol
from pytest_minictr.caller.result import Result
from pytest_minictr.caller.runtime import Container, ContainerRuntime
from pytest_minictr.cli.detached.records import Store, process_start_time
from pytest_minictr.errors import ConfigError, MinictrError
from pytest_minictr.keywords import make_exec_spec
from pytest_minictr.spec import ContainerSpec

CONTROL = "control"


def request(directory: Path, message: dict, fds: tuple[int, ...] = ()) -> dict:
    """One request to a shim and its reply; ConnectionError if the shim is gone."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(directory / CONTROL))
        protocol.send_message(sock, message, list(fds))
        reply = protocol.recv_message(sock)
    if reply is None:
        raise ConnectionError("the shim closed the connection")
    return reply[0]


def main() -> int:
    order = json.loads(sys.stdin.read())
    answer = _take_stdout()
    store = Store(Path(order["state_dir"]))
    container_id = order["id"]
    runtime = ContainerRuntime()
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(2)]
    try:
        container = runtime.launch(ContainerSpec.from_dict(order["spec"]),
                                   stdout=pipes[0][1], stderr=pipes[1][1])
    except MinictrError as error:
        _answer(answer, _error_reply(error))
        runtime.close()
        return 1
    finally:
        for _, write_end in pipes:
            os.close(write_end)  # the container holds its own: EOF when it ends
    copiers = [threading.Thread(target=copy_with_times, args=(read_end, Path(log)))
               for (read_end, _), log in zip(pipes, store.read(container_id).logs, strict=True)]
    for copier in copiers:
        copier.start()
    server = hold(store, container_id, runtime, container)
    _answer(answer, {"ok": True})
    result = container.wait()
    for copier in copiers:  # every line in the logs before the end is recorded
        copier.join()
    record_end(store, container_id, container, result, server)
    runtime.close()
    return 0


def hold(store: Store, container_id: str, runtime: ContainerRuntime, container: Container,
         asked: list[int] | None = None) -> socket.socket:
    """Make the running `container` reachable by other minictr commands: its record says it
    runs, held by this process (the shim, or `minictr run --name` in the foreground), and
    its control socket is served. `asked` collects the signals they send (an end asked for)."""
    directory = store.path(container_id)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(directory / CONTROL))
    server.listen()
    store.update(container_id, status="running", init_pid=container.pid, shim_pid=os.getpid(),
                 shim_started=process_start_time(os.getpid()),
                 ports=[[port, *where] for port, where in container.published.items()])
    threading.Thread(target=_serve, args=(server, runtime, container, asked),
                     daemon=True).start()
    return server


def record_end(store: Store, container_id: str, container: Container, result: Result,
               server: socket.socket) -> None:
    """The end of a held container in its record (which goes, with --rm), the socket closed."""
    record = store.update(container_id, status=str(container.status),
                          returncode=result.returncode, finished=time.time())
    server.close()
    if record.remove:
        store.remove(container_id)


def copy_with_times(read_end: int, log: Path) -> None:
    """The container's output into `log`, and when each of its lines began into the
    `.times` file beside it (`minictr logs --timestamps`): `OFFSET EPOCH-SECONDS` lines."""
    offset, at_line_start = 0, True
    with open(read_end, "rb", buffering=0) as source, open(log, "wb", buffering=0) as out, \
            open(log.with_suffix(".times"), "w", buffering=1) as times:
        while data := source.read(65536):
            now = time.time()
            starts = [offset] if at_line_start else []
            starts += [offset + i + 1 for i, byte in enumerate(data[:-1]) if byte == 10]
            times.writelines(f"{start} {now:.6f}\n" for start in starts)
            out.write(data)
            offset += len(data)
            at_line_start = data.endswith(b"\n")


def _error_reply(error: MinictrError) -> dict:
    return {"ok": False, **protocol.error_fields(error)}


def _take_stdout() -> int:
    """Keep the CLI's pipe for our answer alone, and put /dev/null in its place: the launcher
    we start inherits our stdout, and must not hold the CLI's pipe open."""
    answer = os.dup(1)
    os.set_inheritable(answer, False)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    return answer


def _answer(fd: int, reply: dict) -> None:
    """The one line the CLI waits for; closing the pipe after it lets the CLI return."""
    os.write(fd, json.dumps(reply).encode() + b"\n")
    os.close(fd)


def _serve(server: socket.socket, runtime: ContainerRuntime, container: Container,
           asked: list[int] | None) -> None:
    while True:
        try:
            connection, _ = server.accept()
        except OSError:
            return  # closed: the container has ended
        threading.Thread(target=_handle, args=(connection, runtime, container, asked),
                         daemon=True).start()


def _handle(connection: socket.socket, runtime: ContainerRuntime, container: Container,
            asked: list[int] | None) -> None:
    with connection:
        received = protocol.recv_message(connection)
        if received is None:
            return
        message, fds = received
        try:
            reply = _answer_request(message, fds, runtime, container, asked)
        except MinictrError as error:
            reply = _error_reply(error)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            protocol.send_message(connection, reply)
        except OSError:
            pass  # the asking command went away


def _answer_request(message: dict, fds: list[int], runtime: ContainerRuntime,
                    container: Container, asked: list[int] | None) -> dict:
    op = message.get("op")
    if op in ("stop", "signal") and asked is not None:
        asked.append(signal.SIGTERM if op == "stop" else int(message["signum"]))
    if op == "stop":
        return {"ok": True, "returncode": container.stop(float(message["grace"])).returncode}
    if op == "signal":
        container.send_signal(int(message["signum"]))
        return {"ok": True}
    if op == "stats":
        stats = container.stats()
        return {"ok": True, "stats": {**vars(stats), "limits": vars(stats.limits)}}
    if op == "exec":
        spec = replace(make_exec_spec(container.spec, message["command"], message.get("env"),
                                      message.get("timeout")),
                       terminal=bool(message.get("terminal")))
        stdin, stdout, stderr = fds
        result = runtime._launch(spec, None, stdin, stdout, stderr, exec_of=container.id).wait()
        return {"ok": True, "result": result.to_dict(head=0)}
    return _error_reply(ConfigError(f"unknown request {op!r}"))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the starting terminal is not ours
    sys.exit(main())
