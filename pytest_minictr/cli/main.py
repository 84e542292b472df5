"""The `minictr` command (also `python -m pytest_minictr`), spelled as Docker users expect.

    minictr run [-it] [-d] [--rm] [--name NAME] [--memory 64M] [--cpus 0.5] [--pids N]
                [--timeout S] [--network MODE] [--hostname H] [-e NAME[=VALUE]]...
                [--env-file FILE] [-w DIR] [-v HOST:CTR[:ro]]... [--mount SPEC]...
                [--read-only] [--rootfs DIR | --recipe NAME] [--bin NAME]...
                [--no-userns] [-u UID[:GID]] [--no-seccomp] [--allow-syscall NAME]...
                [--cap-add CAP]... [--ulimit NAME=SOFT[:HARD]]... -- CMD ARGS...
    minictr rootfs build|import|list|prune ...;  minictr doctor [--json];  minictr --version
    minictr pull|images|rmi|image prune|image inspect|login|logout ...   (`image_commands`)
    minictr grade JOBS.jsonl [-o RESULTS.jsonl] [--workers N] [--resume] [--progress]
    minictr ps|stop|kill|logs|wait|inspect|stats|rm|exec ...   (detached: see `detached`)

`run` passes stdin, stdout and stderr through and exits with the command's status: 128+N when
it died of signal N, 125 when minictr itself failed (one line on stderr, no traceback; usage
errors too), 126 or 127 when the command cannot be executed or is not there (as a shell would).
An end the user did not ask for (OOM kill, timeout, a signal) says so in one stderr line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from pytest_minictr.caller.runtime import Container, ContainerRuntime
from pytest_minictr.cli import docker_flags, image_commands, rootfs_commands
from pytest_minictr.cli import grade as grade_commands
from pytest_minictr.cli.detached import commands as lifecycle
from pytest_minictr.cli.detached.foreground import ForegroundRecord
from pytest_minictr.cli.ends import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    EXIT_RUNTIME_ERROR,
    exit_status,
    print_end_line,
    reader_went_away,
)
from pytest_minictr.cli.flags import Parser, add_keyword_flags, command_of, flag_value, spelled
from pytest_minictr.cli.terminal import Terminal, run_on_terminal
from pytest_minictr.cli.version import version_text
from pytest_minictr.doctor import checks as doctor
from pytest_minictr.errors import CommandNotFoundError, ConfigError, MinictrError
from pytest_minictr.keywords import BY_NAME, FLAG_KEYWORDS, spec_from
from pytest_minictr.rootfs.builder import RootfsBuilder
from pytest_minictr.rootfs.cache import default_command
from pytest_minictr.rootfs.defaults import default_binaries
from pytest_minictr.spec import ContainerSpec

RUN_USAGE = ("minictr run [OPTIONS] IMAGE [CMD [ARGS...]]  or  "
             "minictr run [OPTIONS] -- CMD [ARGS...]")
HELP_ROOTFS = "run on this prepared root filesystem instead of building one"
HELP_BIN = "also copy this host binary (with its libraries) into the built rootfs; repeatable"
HELP_RECIPE = BY_NAME["recipe"].help
HELP_JSON = ("capture the output and print one JSON object: verdict, status, times, memory, "
             "and the head of stdout and stderr (an `error` key if minictr failed)")
HELP_DETACH = ("run in the background: print the container's id and return (see ps, logs, "
               "exec, wait, stop, rm)")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            status = _handle(argv)
        finally:
            # Into a pipe stdout is block-buffered: what we printed (argparse's --help too) is
            # written now, where a reader gone is ours to handle, and not at the interpreter's
            # exit, which would say 'Exception ignored' and end with 120
            sys.stdout.flush()
    except BrokenPipeError:
        return reader_went_away()
    return status


def _handle(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except MinictrError as error:
        _complain(error, _wants_json(argv))
        return _status_of(error)


def _status_of(error: BaseException) -> int:
    if isinstance(error, CommandNotFoundError):
        return EXIT_CANNOT_EXECUTE if error.errno in (13, 8, 21) else EXIT_NOT_FOUND
    return EXIT_RUNTIME_ERROR


def _wants_json(argv: list[str]) -> bool:
    """--json among the options (not in the command after `--`): even a line that does not
    parse then answers in JSON."""
    options = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in options


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minictr", description="Daemonless Linux containers.")
    parser.add_argument("--version", action="store_true",
                        help="print the version, setup path, cgroup backend and kernel")
    parser.set_defaults(handler=show_version)
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    add_run_command(commands)
    lifecycle.add_commands(commands)
    rootfs_commands.add_commands(commands, HELP_RECIPE)
    image_commands.add_commands(commands)
    grade_commands.add_commands(commands)
    doctor_command = commands.add_parser(
        "doctor", help="check what this host lets minictr do, and say how to fix the rest")
    doctor_command.add_argument("--json", action="store_true", help="one JSON object")
    doctor_command.set_defaults(handler=lambda args: doctor.main(args.json))
    return parser


def show_version(args: argparse.Namespace) -> int:
    if not args.version:
        raise ConfigError("a command is missing: run, exec, ps, logs, rootfs, doctor... "
                          "(see `minictr --help`)")
    print(version_text())
    return 0


def add_run_command(commands: argparse._SubParsersAction[Any]) -> None:
    run = commands.add_parser("run", help="run one command in a new container", usage=RUN_USAGE)
    add_keyword_flags(run)
    run.add_argument("--interactive", "-i", action="store_true",
                     help="keep stdin attached (it always is without -t)")
    run.add_argument("--tty", "-t", action="store_true",
                     help="give the command a pseudo-terminal (with -i: an interactive shell)")
    run.add_argument("--volume", "-v", action="append", default=[], metavar="HOST:CTR[:ro]",
                     help="bind a host path (read-write unless :ro); repeatable")
    run.add_argument("--mount", action="append", default=[], metavar="SPEC",
                     help="type=bind,source=/a,target=/b[,readonly] or "
                          "type=tmpfs,target=/x[,tmpfs-size=16M]; repeatable")
    run.add_argument("--env-file", action="append", default=[], metavar="FILE",
                     help="NAME=VALUE lines to add to the environment; repeatable")
    run.add_argument("--json", action="store_true", help=HELP_JSON)
    source = run.add_mutually_exclusive_group()
    source.add_argument("--rootfs", metavar="DIR", help=HELP_ROOTFS)
    source.add_argument("--recipe", metavar="NAME", help=HELP_RECIPE)
    run.add_argument("--bin", action="append", default=[], metavar="NAME", help=HELP_BIN)
    run.add_argument("--detach", "-d", action="store_true", help=HELP_DETACH)
    run.add_argument("--rm", action="store_true",
                     help="remove the container's record once it ends (with -d or --name)")
    run.add_argument("--name", type=_name_flag, metavar="NAME",
                     help="a name to use wherever an id is (unique); in the foreground too, "
                          "where `ps`, `exec`, `stop` then reach it from another shell")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    run.set_defaults(handler=run_command, parser=run)


def _source_shown(image: str | None, args: argparse.Namespace) -> str:
    """What a container runs on, as `ps` shows it (Docker's IMAGE column): as the user named
    it, not the store's or the cache's directory."""
    if image is not None:
        return image
    if args.rootfs:
        return str(args.rootfs)
    return f"recipe {args.recipe}" if args.recipe else "host binaries"


def _name_flag(text: str) -> str:
    try:
        return docker_flags.check_name(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_command(args: argparse.Namespace) -> int:
    image = _image_of(args)
    # a recipe's (or a built rootfs's, or an image's) default command stands in for a
    # missing one
    command = (args.command[1:] or None) if image is not None \
        else None if args.command in ([], ["--"]) and (args.recipe or args.rootfs) \
        else command_of(args, RUN_USAGE)
    _check_combinations(args)
    given = {keyword.name: flag_value(keyword, getattr(args, keyword.name))
             for keyword in FLAG_KEYWORDS if hasattr(args, keyword.name)}
    given.update(_docker_keywords(args, given))
    checked = {keyword.name: keyword.validate(given[keyword.name], spelled(keyword))
               for keyword in BY_NAME.values() if keyword.name in given}
    if image is not None:
        spec = spec_from(image, command, checked)
    else:
        rootfs = _rootfs_for(command[0] if command else None, args)
        if command is None and args.rootfs:  # the image's Cmd, or why there is none
            command = list(default_command(rootfs, f"--rootfs {args.rootfs} and no command"))
        spec = spec_from(rootfs, command, checked)  # a bad value fails here, before anything
    if args.tty:
        spec = dataclasses.replace(spec, terminal=True, env=_with_host_term(spec.env))
    source = _source_shown(image, args)
    if args.detach:
        return lifecycle.run_detached(spec, given, name=args.name, remove=args.rm,
                                      image=source)
    with ForegroundRecord(spec, given, args.name, args.rm, source) as record:
        if args.tty:
            return _run_on_terminal(spec, args, record)
        # --json: the output is captured for the report, the rest passes through
        streams: dict[str, Any] = {} if args.json \
            else {"stdout": sys.stdout, "stderr": sys.stderr}
        with ContainerRuntime() as runtime:
            container = runtime.launch(spec, stdin=sys.stdin, **streams)
            with forwarding_signals(container) as asked:
                record.hold(runtime, container, asked)
                result = container.wait()
            record.ended(container, result)
    report = result.to_dict()
    if args.json:
        print(json.dumps(report))
    else:
        print_end_line(report, spec.limits.memory, spec.timeout, asked=bool(asked))
    return exit_status(result.returncode)


def _check_combinations(args: argparse.Namespace) -> None:
    if args.tty and (args.detach or args.json):
        raise ConfigError(f"-t with {'-d' if args.detach else '--json'}: minictr cannot attach "
                          "a terminal later; use `minictr exec -it NAME sh` on a detached one")


def _docker_keywords(args: argparse.Namespace, given: dict) -> dict:
    """-v, --mount and --env-file, as the keywords they add to."""
    added: dict[str, Any] = {}
    mounts = [*map(docker_flags.volume_mount, args.volume),
              *map(docker_flags.mount_option, args.mount)]
    if mounts:
        added["mounts"] = tuple(mounts)
    from_files = {}
    for path in args.env_file:
        from_files.update(docker_flags.env_file(path))
    if from_files:  # -e beats --env-file, as in Docker
        added["env"] = {**from_files, **(given.get("env") or {})}
    return added


def _with_host_term(env: tuple) -> tuple:
    # the pty is a real terminal: the command may drive it as ours (TERM=dumb was for pipes)
    term = os.environ.get("TERM") or "xterm"
    return tuple((name, term if name == "TERM" else value) for name, value in env)


def _run_on_terminal(spec: ContainerSpec, args: argparse.Namespace,
                     record: ForegroundRecord) -> int:
    terminal = Terminal(interactive=args.interactive)
    try:
        with ContainerRuntime() as runtime:
            container = runtime.launch(spec, stdin=terminal.console, stdout=terminal.console,
                                       stderr=terminal.console)
            terminal.close_console()
            # in raw mode ^C is a byte for the pty; a SIGINT that still comes (`kill -INT`,
            # or -t without -i, where our terminal stays cooked) is the container's too
            with forwarding_signals(container) as asked:
                record.hold(runtime, container, asked)
                result = run_on_terminal(terminal, container.wait)
            record.ended(container, result)
    finally:
        terminal.close()
    print_end_line(result.to_dict(), spec.limits.memory, spec.timeout, asked=bool(asked))
    return exit_status(result.returncode)


class forwarding_signals:
    """Our signals go to the container while it runs (their handlers are put back after:
    main() may be called in-process, by tests, whose Ctrl-C must work again). The list it
    gives holds the signals forwarded: an end by those was asked for."""

    def __init__(self, container: Container, signals: Iterable[int] = FORWARDED):
        self.container = container
        self.signals = signals
        self.forwarded: list[int] = []

    def __enter__(self) -> list[int]:
        def forward(number, _frame):
            self.forwarded.append(number)
            self.container.send_signal(number)
        self.previous = {signum: signal.signal(signum, forward) for signum in self.signals}
        return self.forwarded

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _image_of(args: argparse.Namespace) -> str | None:
    """Docker's `run IMAGE [CMD...]`: the first word, unless `--` comes first (the command
    then runs on a rootfs built from this host's binaries) or --rootfs/--recipe gives one."""
    if args.rootfs or args.recipe or not args.command or args.command[0] == "--":
        return None
    if args.bin:
        args.parser.error("--bin adds to the rootfs built from host binaries, not to an "
                          f"image ({args.command[0]!r}); put -- before the command to build one")
    if args.command[1:2] == ["--"]:  # `run IMAGE -- CMD`
        del args.command[1]
    image: str = args.command[0]
    return image


def _rootfs_for(program: str | None, args: argparse.Namespace) -> str:
    """The rootfs of `run`: --rootfs, else the recipe's, else the default one (sh and the
    usual coreutils of this host) with the command and the --bin extras; built ones cached."""
    if args.rootfs:
        return _prepared_rootfs(args.rootfs)
    if args.recipe:
        return str(RootfsBuilder().build(recipe=args.recipe, binaries=args.bin))
    assert program is not None  # a run without a command has --rootfs or --recipe
    return str(RootfsBuilder().build(binaries=default_binaries(
        (_host_program(program), *args.bin))))


def _prepared_rootfs(path: str) -> str:
    if not os.path.isdir(path):
        problem = "does not exist" if not os.path.lexists(path) else "is not a directory"
        raise ConfigError(f"--rootfs {path!r}: {problem} (make one with `minictr rootfs build "
                          "DIR --bin sh` or `minictr rootfs import IMAGE.tar DIR`)")
    return path


def _host_program(program: str) -> str:
    """The host file the command names, to copy into the rootfs; 126 or 127 where there is
    none to run, as a shell would say."""
    if "/" in program:
        if not os.path.lexists(program):
            raise CommandNotFoundError(f"{program!r}: no such file on this host", "exec", 2)
        if os.path.isdir(program):
            raise CommandNotFoundError(f"{program!r} is a directory, not a program",
                                       "exec", 21)
        if not os.access(program, os.X_OK):
            raise CommandNotFoundError(f"{program!r} is not executable (chmod +x it)",
                                       "exec", 13)
        return program
    if not shutil.which(program):
        raise CommandNotFoundError(f"command {program!r} not found on this host's PATH, so "
                                   "it cannot be copied into the rootfs (give --rootfs DIR "
                                   "or --recipe NAME)", "exec", 2)
    return program


def _complain(error: BaseException, as_json: bool = False) -> None:
    # one line, whatever the message holds (the launcher's 'chdir to /a\nb' had two)
    text = str(error).replace("\r", "\\r").replace("\n", "\\n")
    if as_json:
        print(json.dumps({"error": text, "type": type(error).__name__,
                          "returncode": _status_of(error)}))
    print(f"minictr: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
