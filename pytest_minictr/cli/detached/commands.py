"""The CLI's detached containers, across processes, daemonless: `minictr run -d` and then
`ps`, `stop`, `kill`, `exec`, `logs`, `wait`, `inspect`, `stats`, `rm`; each takes an id or
the container's --name. Records live in the state directory (`records`); each running
container is held by its shim (`shim`), which these commands reach through its control socket.

Exit statuses, as Docker's: 0 done; 125 minictr failed (unknown id, `rm` of a running one
without -f), with one `minictr: error: ...` line; `exec` exits with its command's status (126,
127 when it cannot run; 128+N after signal N), as `run` does. `stop` and `kill` of a
container that has ended already succeed, quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from pytest_minictr import protocol
from pytest_minictr.cli.detached import logs, shim
from pytest_minictr.cli.detached.records import Store
from pytest_minictr.cli.ends import exit_status, print_end_line
from pytest_minictr.cli.flags import argparse_type, command_of, flag_value
from pytest_minictr.cli.terminal import Terminal, run_on_terminal
from pytest_minictr.cli.text import print_table, size_text
from pytest_minictr.errors import ConfigError, ContainerNotFoundError, MinictrError
from pytest_minictr.keywords import BY_NAME
from pytest_minictr.spec import ContainerSpec

SHIM_START_TIMEOUT = 120.0  # seconds for the shim to start the container and answer
EXEC_USAGE = "minictr exec [OPTIONS] ID -- CMD [ARGS...]"


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """The lifecycle subcommands, on the CLI's subparsers."""
    ps = commands.add_parser("ps", help="list detached containers")
    ps.add_argument("--all", "-a", action="store_true", help="also those that have ended")
    ps.add_argument("--json", action="store_true",
                    help="one JSON array of the records (`[]` when there are none)")
    ps.add_argument("--quiet", "-q", action="store_true", help="only the ids, one a line")
    ps.add_argument("--prune", action="store_true", help="remove the records of ended ones")
    ps.set_defaults(handler=list_containers)

    stop = commands.add_parser("stop", help="SIGTERM, then SIGKILL of everything after --time")
    stop.add_argument("id")
    stop.add_argument("--time", "-t", type=float, default=10.0, metavar="SECONDS",
                      help="grace before SIGKILL (default 10)")
    stop.set_defaults(handler=stop_container)

    kill = commands.add_parser("kill", help="send a signal to the command (default SIGKILL)")
    kill.add_argument("id")
    kill.add_argument("signal", nargs="?", default="KILL", help="name or number, e.g. TERM")
    kill.set_defaults(handler=kill_container)

    exec_command = commands.add_parser("exec", help="run a command in a running container",
                                       usage=EXEC_USAGE)
    exec_command.add_argument("--env", "-e", action="append", type=argparse_type(BY_NAME["env"]),
                              default=[], metavar="NAME[=VALUE]")
    exec_command.add_argument("--timeout", type=float, metavar="SECONDS")
    exec_command.add_argument("--interactive", "-i", action="store_true",
                              help="keep stdin attached (it always is without -t)")
    exec_command.add_argument("--tty", "-t", action="store_true",
                              help="give the command a pseudo-terminal")
    exec_command.add_argument("id")
    exec_command.add_argument("command", nargs=argparse.REMAINDER)
    exec_command.set_defaults(handler=exec_in_container, parser=exec_command)

    logs.add_command(commands)

    wait = commands.add_parser("wait", help="wait for a container to end; print its status")
    wait.add_argument("ids", nargs="+", metavar="ID")
    wait.set_defaults(handler=wait_for_containers)

    inspect = commands.add_parser("inspect", help="a container's record, as JSON")
    inspect.add_argument("ids", nargs="+", metavar="ID")
    inspect.set_defaults(handler=inspect_containers)

    stats = commands.add_parser("stats", help="a running container's figures now")
    stats.add_argument("id")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=show_stats)

    port = commands.add_parser("port", help="a running container's published ports")
    port.add_argument("id")
    port.add_argument("port", nargs="?", type=int, help="only this container port")
    port.set_defaults(handler=show_ports)

    rm = commands.add_parser("rm", help="remove the record of an ended container")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.add_argument("--force", "-f", action="store_true", help="stop it first if it runs")
    rm.set_defaults(handler=remove_containers)


def run_detached(spec: ContainerSpec, options: dict, name: str | None = None,
                 remove: bool = False, image: str = "") -> int:
    """Start the container of `spec` (checked by `run`) under a shim of its own, print its id
    once it runs. `options`: the flags given, kept in the record; `image`: what it runs on,
    as `ps` shows it."""
    store = Store()
    record = store.new(spec.argv, spec.rootfs, as_json(options), name, remove, logs=True,
                       image=image)
    order = {"state_dir": str(store.root), "id": record.id, "spec": spec.to_dict()}
    started = subprocess.Popen([sys.executable, "-m", "pytest_minictr.cli.detached.shim"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    assert started.stdin is not None and started.stdout is not None  # both are PIPE
    with started.stdin:
        started.stdin.write(json.dumps(order).encode())
    answer = _read_answer(started)
    if not answer.get("ok"):
        started.kill()
        started.wait()
        store.remove(record.id)
        raise protocol.error_of(answer)
    print(record.id)
    return 0


def _read_answer(started: subprocess.Popen) -> dict:
    """The shim's one line (it keeps running: not communicate(), which waits for its end)."""
    assert started.stdout is not None  # a PIPE
    with started.stdout:
        if not select.select([started.stdout], [], [], SHIM_START_TIMEOUT)[0]:
            return {"message": f"the shim did not answer in {SHIM_START_TIMEOUT:g} s"}
        line = started.stdout.readline()
        if not line:
            return {"message": "the shim failed"}
        try:
            return json.loads(line)
        except ValueError:
            return {"message": "the shim's answer was unreadable"}


def list_containers(args: argparse.Namespace) -> int:
    store = Store()
    records = store.all()
    if args.prune:
        for record in records:
            if not record.alive:
                _remove_quietly(store, record.id)
        records = [r for r in records if r.alive]
    shown = records if args.all else [r for r in records if r.alive]
    if args.json:  # one document, as `inspect` prints: a reader parses it at once
        print(json.dumps([{**vars(record), "status": record.shown_status} for record in shown]))
        return 0
    if args.quiet:
        for record in shown:
            print(record.id)
        return 0
    print_table([("ID", "NAME", "IMAGE", "STATUS", "CREATED", "COMMAND")] + [
        (record.id, record.name or "-", record.image or record.rootfs or "-", record.shown_status,
         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)),
         " ".join(record.command)) for record in shown])
    return 0


def stop_container(args: argparse.Namespace) -> int:
    if args.time < 0:
        raise ConfigError(f"--time {args.time:g}: expected 0 or more seconds")
    container_id = Store().resolve(args.id)
    if _ask_if_running(container_id, {"op": "stop", "grace": args.time}) is not None:
        # the shim records the end just after it answers: wait for it, so that `ps` agrees
        Store().wait_for(container_id, lambda record: not record.alive, 10.0)
    return 0


def kill_container(args: argparse.Namespace) -> int:
    signum = _signal_number(args.signal)
    _ask_if_running(Store().resolve(args.id), {"op": "signal", "signum": signum})
    return 0


def exec_in_container(args: argparse.Namespace) -> int:
    args = _options_after_id(args)
    command = command_of(args, EXEC_USAGE)
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout:g}: expected a positive number of seconds")
    env = flag_value(BY_NAME["env"], args.env)
    if args.tty:  # a real terminal now: the command may drive it as ours (not TERM=dumb)
        env = {"TERM": os.environ.get("TERM") or "xterm", **env}
    message = {"op": "exec", "command": command, "env": env or None, "timeout": args.timeout,
               "terminal": args.tty}
    container_id = Store().resolve(args.id)
    if args.tty:
        terminal = Terminal(interactive=args.interactive)
        try:
            fds = (terminal.console,) * 3
            reply = run_on_terminal(terminal, lambda: _ask(container_id, message, fds=fds))
        finally:
            terminal.close()
    else:
        reply = _ask(container_id, message, fds=(0, 1, 2))
    print_end_line(reply["result"], None, args.timeout)
    return exit_status(reply["result"]["returncode"])


def _options_after_id(args: argparse.Namespace) -> argparse.Namespace:
    """`exec ID --env X -- CMD`: options between the id and `--` count as options (they were
    taken for the command); without `--`, an option there is refused rather than run."""
    command = args.command
    if "--" in command and command[0] != "--":
        end = command.index("--")
        return args.parser.parse_args([*command[:end], args.id, *command[end:]])
    if command and command[0].startswith("-") and command[0] != "--":
        raise ConfigError(f"minictr exec: option {command[0]!r} after the container: put it "
                          f"before ID, or end the options with `--` ({EXEC_USAGE})")
    return args


def wait_for_containers(args: argparse.Namespace) -> int:
    store = Store()
    for container_id in map(store.resolve, args.ids):
        record = store.wait_for(container_id, lambda r: not r.alive, float("inf"))
        print("" if record.returncode is None else exit_status(record.returncode))
    return 0


def inspect_containers(args: argparse.Namespace) -> int:
    store = Store()
    records = [store.read(store.resolve(reference)) for reference in args.ids]
    print(json.dumps([{**vars(record), "state": {
        "status": record.shown_status, "running": record.alive,
        "exit_code": None if record.returncode is None else exit_status(record.returncode)}}
        for record in records], indent=2))
    return 0


def show_stats(args: argparse.Namespace) -> int:
    stats = _ask(Store().resolve(args.id), {"op": "stats"})["stats"]
    if args.json:
        print(json.dumps(stats))
        return 0
    for name, value in stats.items():
        print(f"{name}: {_stat_text(name, value)}")
    return 0


def _stat_text(name: str, value: Any) -> str:
    """One figure of `stats` as a person reads it: sizes in K/M/G, limits as words."""
    if name == "limits":
        return ", ".join(f"{limit} {'unlimited' if amount is None else _stat_text(limit, amount)}"
                         for limit, amount in value.items())
    if value is None:
        return "unknown"  # this host has no such figure (no cgroup)
    if name.startswith("memory"):
        return size_text(value)
    if name == "cpu_time":
        return f"{value:.3f} s"
    return "yes" if value is True else "no" if value is False else str(value)


def show_ports(args: argparse.Namespace) -> int:
    """docker's `port`: one line per published port, `80/tcp -> 127.0.0.1:8080`; with a
    port, only where it is published (exit 1 if it is not)."""
    store = Store()
    record = store.read(store.resolve(args.id))  # an id or a --name
    if not record.alive:
        raise ContainerNotFoundError(f"container {args.id} is not running "
                                     f"({record.shown_status})")
    shown = [(port, address, host_port) for port, address, host_port in record.ports
             if args.port in (None, port)]
    for port, address, host_port in shown:
        where = f"[{address}]:{host_port}" if ":" in address else f"{address}:{host_port}"
        print(where if args.port is not None else f"{port}/tcp -> {where}")
    if args.port is not None and not shown:
        print(f"minictr: container port {args.port} is not published", file=sys.stderr)
        return 1
    return 0


def remove_containers(args: argparse.Namespace) -> int:
    store = Store()
    for container_id in map(store.resolve, args.ids):
        if args.force and store.read(container_id).alive:
            try:
                _ask(container_id, {"op": "stop", "grace": 0})
            except ContainerNotFoundError:
                pass  # it ended meanwhile
            store.wait_for(container_id, lambda r: not r.alive, 10.0)
        store.remove(container_id)
    return 0


def _ask(container_id: str, message: dict, fds: tuple[int, ...] = ()) -> dict:
    reply = _ask_if_running(container_id, message, fds)
    if reply is None:
        raise ContainerNotFoundError(f"container {container_id} is not running: "
                                     f"{Store().read(container_id).shown_status}")
    return reply


def _ask_if_running(container_id: str, message: dict, fds: tuple[int, ...] = ()
                    ) -> dict | None:
    """The shim's reply; None if the container has ended (or its shim is gone)."""
    store = Store()
    if not store.read(container_id).alive:
        return None
    try:
        reply = shim.request(store.path(container_id), message, fds)
    except OSError:
        return None
    if not reply.get("ok"):
        raise protocol.error_of(reply)
    return reply


def as_json(options: dict) -> dict:
    """The flags given, as the record keeps them (a Mount as its fields)."""
    return json.loads(json.dumps(options, default=vars))


def _remove_quietly(store: Store, container_id: str) -> None:
    try:
        store.remove(container_id)
    except MinictrError:
        pass  # came back to life? never: but another prune may have removed it


def _signal_number(name: str) -> int:
    text = name.upper()
    try:
        return int(text) if text.isdigit() else int(getattr(
            signal, text if text.startswith("SIG") else f"SIG{text}"))
    except (AttributeError, ValueError):
        raise ConfigError(f"signal {name!r}: expected a name (TERM, KILL, HUP...) or a "
                          "number") from None
