"""The `minictr` command (also `python -m pytest_minictr`).

    minictr run [--memory 64M] [--cpus 0.5] [--pids N] [--timeout S] [--network MODE]
                [--hostname H] [--env K=V]... [--rootfs DIR | --bin NAME ...]
                [--no-userns] [--no-seccomp] [--allow-syscall NAME]... [--cap-add CAP]...
                [--ulimit NAME=SOFT[:HARD]]... -- CMD ARGS...
    minictr rootfs build [--bin NAME ...] DEST
    minictr doctor [--json]
    minictr run -d ... -- CMD; minictr ps [--all] [--json] [--prune]; minictr stop|kill|logs|
        stats|rm ID; minictr exec ID -- CMD   (detached containers: see `lifecycle`)

`run` passes stdin, stdout and stderr through and exits with the command's status: 128+N when
it died of signal N, 125 when minictr itself failed (one line on stderr, no traceback), 126 or
127 when the command cannot be executed or is not in the rootfs (as a shell would).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from typing import Sequence

from pytest_minictr.caller.runtime import ContainerRuntime
from pytest_minictr.cli.detached import commands as lifecycle
from pytest_minictr.doctor import checks as doctor
from pytest_minictr.errors import CommandNotFoundError, MinictrError
from pytest_minictr.rootfs import images
from pytest_minictr.rootfs.builder import RootfsBuilder
from pytest_minictr.spec import NETWORK_MODES, make_spec, parse_cpus

EXIT_RUNTIME_ERROR = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

HELP_MEMORY = "memory limit, e.g. 64M or 1G (swap excluded)"
HELP_CPUS = "CPU limit in CPUs, like docker: 0.5 is half of one CPU"
HELP_PIDS = "most processes and threads alive at once"
HELP_TIMEOUT = "seconds of wall time, then the whole container is killed"
HELP_NETWORK = "none: no interface up; loopback: lo up (default); never the host's network"
HELP_ROOTFS = "run on this prepared root filesystem instead of building one"
HELP_BIN = "also copy this host binary (with its libraries) into the built rootfs; repeatable"
HELP_ENV = "set NAME=VALUE in the container's (otherwise clean) environment; repeatable"
HELP_NO_USERNS = ("make container root host root (root only; by default it is an "
                  "unprivileged host uid)")
HELP_NO_SECCOMP = "do not install the default seccomp filter"
HELP_ALLOW_SYSCALL = "let this call through the default seccomp filter; repeatable"
HELP_CAP_ADD = "keep this capability too (e.g. NET_RAW, SYS_PTRACE); repeatable"
HELP_ULIMIT = ("resource limit, like docker: nofile=8192, core=unlimited, stack=8388608:67108864 "
               "(bytes); repeatable")
HELP_RECIPE = "build the rootfs from this recipe (minimal, busybox, python3, or a .toml path)"
HELP_OUTPUT_LIMIT = "bytes kept of each output stream (default 64M); the rest is dropped"
HELP_LAYER_SIZE = "most bytes the container may write to its filesystem (ENOSPC past it)"
HELP_JSON = ("capture the output and print one JSON object: verdict, status, times, memory, "
             "and the head of stdout and stderr")
HELP_DETACH = ("run in the background: print the container's id and return (see ps, logs, "
               "exec, stop, rm)")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CommandNotFoundError as error:
        _complain(error)
        return EXIT_CANNOT_EXECUTE if error.errno == 13 else EXIT_NOT_FOUND
    except MinictrError as error:
        _complain(error)
        return EXIT_RUNTIME_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minictr", description="Daemonless Linux containers.")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run one command in a new container",
                              usage="minictr run [OPTIONS] -- CMD [ARGS...]")
    run.add_argument("--memory", help=HELP_MEMORY)
    run.add_argument("--cpus", type=_cpus, help=HELP_CPUS)
    run.add_argument("--pids", type=int, help=HELP_PIDS)
    run.add_argument("--timeout", type=float, help=HELP_TIMEOUT)
    run.add_argument("--network", choices=NETWORK_MODES, default="loopback", help=HELP_NETWORK)
    run.add_argument("--hostname", default="minictr", help="the container's hostname")
    run.add_argument("--cwd", default="/", help="working directory inside the container")
    run.add_argument("--env", action="append", type=lifecycle.env_pair, default=[], metavar="NAME=VALUE",
                     help=HELP_ENV)
    run.add_argument("--no-userns", dest="user", action="store_false", help=HELP_NO_USERNS)
    run.add_argument("--no-seccomp", dest="seccomp", action="store_false", help=HELP_NO_SECCOMP)
    run.add_argument("--allow-syscall", action="append", default=[], metavar="NAME",
                     help=HELP_ALLOW_SYSCALL)
    run.add_argument("--cap-add", action="append", default=[], metavar="CAP", help=HELP_CAP_ADD)
    run.add_argument("--ulimit", action="append", type=_ulimit, default=[],
                     metavar="NAME=SOFT[:HARD]", help=HELP_ULIMIT)
    run.add_argument("--output-limit", metavar="SIZE", help=HELP_OUTPUT_LIMIT)
    run.add_argument("--layer-size", metavar="SIZE", help=HELP_LAYER_SIZE)
    run.add_argument("--json", action="store_true", help=HELP_JSON)
    source = run.add_mutually_exclusive_group()
    source.add_argument("--rootfs", metavar="DIR", help=HELP_ROOTFS)
    source.add_argument("--recipe", metavar="NAME", help=HELP_RECIPE)
    run.add_argument("--bin", action="append", default=[], metavar="NAME", help=HELP_BIN)
    run.add_argument("--detach", "-d", action="store_true", help=HELP_DETACH)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    run.set_defaults(handler=run_command, parser=run)
    lifecycle.add_commands(commands)

    rootfs = commands.add_parser("rootfs", help="build root filesystems")
    rootfs_commands = rootfs.add_subparsers(dest="rootfs_command", required=True,
                                            metavar="COMMAND")
    build = rootfs_commands.add_parser("build", help="build a rootfs into a directory")
    build.add_argument("--recipe", metavar="NAME", help=HELP_RECIPE)
    build.add_argument("--bin", action="append", default=[], metavar="NAME",
                       help="host binary to copy with its libraries; repeatable")
    build.add_argument("dest", help="directory to create (must not exist or be empty)")
    build.set_defaults(handler=build_rootfs, parser=build)
    rootfs_list = rootfs_commands.add_parser("list", help="the rootfs cache: key, recipe, "
                                                          "size, age")
    rootfs_list.add_argument("--json", action="store_true", help="one JSON object per line")
    rootfs_list.set_defaults(handler=images.list_cache)
    prune = rootfs_commands.add_parser("prune", help="empty the rootfs cache")
    prune.set_defaults(handler=images.prune_cache)
    import_command = rootfs_commands.add_parser(
        "import", help="unpack a `docker save` or OCI image tarball into a directory")
    import_command.add_argument("image", help="the image tarball")
    import_command.add_argument("dest", help="directory to create (must not exist or be empty)")
    import_command.add_argument("--max-size", default="16G", metavar="SIZE",
                                help="refuse an image bigger than this unpacked (default 16G)")
    import_command.set_defaults(handler=images.import_command)

    doctor_command = commands.add_parser(
        "doctor", help="check what this host lets minictr do, and say how to fix the rest")
    doctor_command.add_argument("--json", action="store_true", help="one JSON object")
    doctor_command.set_defaults(handler=lambda args: doctor.main(args.json))
    return parser


def run_command(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        args.parser.error("the command to run is missing: minictr run [OPTIONS] -- CMD [ARGS...]")
    rootfs = str(args.rootfs or _build_for(command[0], args))
    keywords = dict(memory_limit=args.memory, cpu_limit=args.cpus, pids_limit=args.pids,
                    timeout=args.timeout, network=args.network, hostname=args.hostname,
                    cwd=args.cwd, env=dict(args.env), user=args.user, seccomp=args.seccomp,
                    allow_syscalls=args.allow_syscall, capabilities=args.cap_add,
                    rlimits=dict(args.ulimit), output_limit=args.output_limit,
                    layer_size=args.layer_size)
    make_spec(rootfs, command, **keywords)  # a bad value fails here, before anything starts
    if args.detach:
        return lifecycle.run_detached(rootfs, command, keywords)
    # --json: the output is captured for the report, the rest passes through
    streams = {} if args.json else {"stdout": sys.stdout, "stderr": sys.stderr}
    with ContainerRuntime() as runtime:
        container = runtime.run(rootfs, command, stdin=sys.stdin, **streams, **keywords)
        previous = {signum: signal.signal(signum, lambda number, _frame:
                                          container.send_signal(number))
                    for signum in FORWARDED}
        try:
            result = container.wait()
        finally:  # main() may be called in-process (tests): its Ctrl-C must work again after
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if args.json:
        print(json.dumps(result.to_dict()))
    elif result.timed_out:
        print(f"minictr: timed out after {args.timeout:g} s", file=sys.stderr)
    return result.returncode if result.returncode >= 0 else 128 - result.returncode


def _build_for(program: str, args: argparse.Namespace):
    """The rootfs of `run` without --rootfs: the recipe's, or the program's own."""
    if args.recipe:
        return RootfsBuilder().build(recipe=args.recipe, binaries=args.bin)
    if not shutil.which(program):
        raise CommandNotFoundError(f"command {program!r} not found on this host's PATH, "
                                   "so it cannot be copied into a rootfs (give --rootfs DIR "
                                   "or --recipe)")
    return RootfsBuilder().build(binaries=[program, *args.bin])


def build_rootfs(args: argparse.Namespace) -> int:
    if not args.bin and not args.recipe:
        args.parser.error("give --recipe NAME and/or --bin NAME")
    print(RootfsBuilder().build(binaries=args.bin, dest=args.dest, recipe=args.recipe))
    return 0


def _cpus(text: str) -> float:
    try:
        return parse_cpus(text, "--cpus")
    except MinictrError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ulimit(text: str) -> tuple[str, tuple]:
    """'nofile=1024:4096' -> ('nofile', (1024, 4096)); the values are checked by the spec."""
    name, sep, value = text.partition("=")
    soft, _, hard = value.partition(":")
    try:
        pair = tuple(v if v == "unlimited" else int(v) for v in (soft, hard or soft))
    except ValueError:
        pair = ()
    if not sep or not name or not pair:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SOFT[:HARD], e.g. "
                                         "nofile=1024:4096 or core=unlimited")
    return name, pair


def _complain(error: BaseException) -> None:
    # one line, whatever the message holds (the launcher's 'chdir to /a\nb' had two)
    text = str(error).replace("\r", "\\r").replace("\n", "\\n")
    print(f"minictr: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
