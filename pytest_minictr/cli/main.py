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
from pytest_minictr.cli import rootfs_commands
from pytest_minictr.cli.detached import commands as lifecycle
from pytest_minictr.cli.flags import add_keyword_flags, command_of, flag_value, spelled
from pytest_minictr.doctor import checks as doctor
from pytest_minictr.errors import CommandNotFoundError, MinictrError
from pytest_minictr.keywords import BY_NAME, FLAG_KEYWORDS
from pytest_minictr.rootfs.builder import RootfsBuilder
from pytest_minictr.spec import spec_from

EXIT_RUNTIME_ERROR = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

HELP_ROOTFS = "run on this prepared root filesystem instead of building one"
HELP_BIN = "also copy this host binary (with its libraries) into the built rootfs; repeatable"
HELP_RECIPE = BY_NAME["recipe"].help
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
    add_keyword_flags(run)
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
    rootfs_subcommands = rootfs.add_subparsers(dest="rootfs_command", required=True,
                                               metavar="COMMAND")
    build = rootfs_subcommands.add_parser("build", help="build a rootfs into a directory")
    build.add_argument("--recipe", metavar="NAME", help=HELP_RECIPE)
    build.add_argument("--bin", action="append", default=[], metavar="NAME",
                       help="host binary to copy with its libraries; repeatable")
    build.add_argument("dest", help="directory to create (must not exist or be empty)")
    build.set_defaults(handler=build_rootfs, parser=build)
    rootfs_list = rootfs_subcommands.add_parser("list", help="the rootfs cache: key, recipe, "
                                                          "size, age")
    rootfs_list.add_argument("--json", action="store_true", help="one JSON object per line")
    rootfs_list.set_defaults(handler=rootfs_commands.list_cache)
    prune = rootfs_subcommands.add_parser("prune", help="empty the rootfs cache")
    prune.set_defaults(handler=rootfs_commands.prune_cache)
    import_command = rootfs_subcommands.add_parser(
        "import", help="unpack a `docker save` or OCI image tarball into a directory")
    import_command.add_argument("image", help="the image tarball")
    import_command.add_argument("dest", help="directory to create (must not exist or be empty)")
    import_command.add_argument("--max-size", default="16G", metavar="SIZE",
                                help="refuse an image bigger than this unpacked (default 16G)")
    import_command.set_defaults(handler=rootfs_commands.import_command)

    doctor_command = commands.add_parser(
        "doctor", help="check what this host lets minictr do, and say how to fix the rest")
    doctor_command.add_argument("--json", action="store_true", help="one JSON object")
    doctor_command.set_defaults(handler=lambda args: doctor.main(args.json))
    return parser


def run_command(args: argparse.Namespace) -> int:
    # a recipe's (or a built rootfs's) default command stands in for a missing one
    command = None if args.command in ([], ["--"]) and (args.recipe or args.rootfs) \
        else command_of(args, "minictr run [OPTIONS] -- CMD [ARGS...]")
    given = {keyword.name: flag_value(keyword, getattr(args, keyword.name))
             for keyword in FLAG_KEYWORDS if hasattr(args, keyword.name)}
    checked = {keyword.name: keyword.validate(given[keyword.name], spelled(keyword))
               for keyword in FLAG_KEYWORDS if keyword.name in given}
    rootfs = str(args.rootfs or _build_for(command and command[0], args))
    spec = spec_from(rootfs, command, checked)  # a bad value fails here, before anything starts
    if args.detach:
        return lifecycle.run_detached(spec, given)
    # --json: the output is captured for the report, the rest passes through
    streams = {} if args.json else {"stdout": sys.stdout, "stderr": sys.stderr}
    with ContainerRuntime() as runtime:
        container = runtime.launch(spec, stdin=sys.stdin, **streams)
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
        print(f"minictr: timed out after {spec.timeout:g} s", file=sys.stderr)
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


def _complain(error: BaseException) -> None:
    # one line, whatever the message holds (the launcher's 'chdir to /a\nb' had two)
    text = str(error).replace("\r", "\\r").replace("\n", "\\n")
    print(f"minictr: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
