"""How `minictr` spells things on its command line: the keyword flags of `run`, as the schema
(`keywords`) declares them, and the command after `--`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from pytest_minictr.errors import MinictrError
from pytest_minictr.keywords import FLAG_KEYWORDS, Keyword


def command_of(args: argparse.Namespace, usage: str) -> list[str]:
    """The command after `--` (or without it); a usage error where there is none."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        args.parser.error(f"the command to run is missing: {usage}")
    return command


def add_keyword_flags(run: argparse.ArgumentParser) -> None:
    """The flags of `run` that set container keywords, as the schema declares them. Absent
    flags stay out of the namespace (SUPPRESS): the spec's defaults apply, unchecked."""
    for keyword in FLAG_KEYWORDS:
        flag = keyword.flag
        assert flag is not None  # FLAG_KEYWORDS are those with one
        options: dict[str, Any] = {"choices": flag.choices} if flag.choices else {}
        if flag.action not in ("store_false", "store_true"):
            options["type"] = argparse_type(keyword)
            options["metavar"] = flag.metavar
        help_text = flag.help or keyword.help
        if flag.action == "append":
            help_text += "; repeatable"
        run.add_argument(*flag.names, dest=keyword.name, action=flag.action,
                         default=argparse.SUPPRESS, help=help_text, **options)


def argparse_type(keyword: Keyword) -> Callable[[str], Any]:
    """The flag's text as its keyword's check takes it; a text that is not even that (a
    number, NAME=VALUE) is argparse's usage error."""
    flag = keyword.flag
    assert flag is not None  # only a keyword with a flag is parsed from one

    def convert(text: str) -> Any:
        try:
            return keyword.from_text(text, flag.names[0])
        except MinictrError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return convert


def flag_value(keyword: Keyword, value: Any) -> Any:
    flag = keyword.flag
    assert flag is not None  # only a keyword with a flag has a flag's value
    return flag.collect(value) if flag.action == "append" else value


def spelled(keyword: Keyword) -> str:
    """How an error names the flag's value: the flag, or for a --no-x flag (or a keyword that
    Docker's flags add to: mounts) its keyword."""
    if keyword.flag is None or keyword.flag.action == "store_false":
        return keyword.name
    return keyword.flag.names[0]


class UsageError(MinictrError):
    """A command line that does not parse: 125 with one line, as any error of minictr's."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ours to report (one line, exit 125, JSON with --json)
    rather than argparse's usage block and exit 2, which Docker users do not expect."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


