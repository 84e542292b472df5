"""Keywords' values: how the text of an option (`--minictr-memory=64M`), an ini key or a
`minictr run` flag becomes the value a keyword's check takes (`keywords.Keyword.from_text`),
and the checks of the keywords that name an image and how it runs (the other checks are
shared, in `validate` and `confinement`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pytest_minictr import validate
from pytest_minictr.errors import ConfigError

Check = Callable[[Any, str], Any]  # (value, the name its user wrote) -> the checked value
PULL_POLICIES = ("missing", "always", "never")  # Docker's --pull


def as_given(text: str, name: str) -> str:
    return text


def number(expected: str, convert: Callable[[str], Any] = float,
           keep_text: bool = False) -> Check:
    """Text of an option or flag as the number its check takes (or, `keep_text`, as itself
    where the check reads text, so that its errors show what was typed); ConfigError if the
    text is no number at all, which the CLI makes a usage error."""
    def parse(text: str, name: str) -> Any:
        try:  # int() refuses '²' and 4300+ digits with ValueError too
            value = convert(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: expected {expected}") from None
        return text if keep_text else value
    return parse


def pair(expected: str, parse_value: Callable[[str], Any] = str) -> Check:
    """'NAME=VALUE' of a repeatable flag as a (name, value) pair."""
    def parse(text: str, name: str) -> tuple[str, Any]:
        key, sep, value = text.partition("=")
        try:
            parsed = parse_value(value)
        except ValueError:
            parsed = None
        if not sep or not key or parsed is None:
            raise ConfigError(f"{name}={text!r}: expected {expected}")
        return key, parsed
    return parse


def env_item(text: str, name: str) -> tuple[str, str | None]:
    """'NAME=VALUE', or 'NAME' alone for the host's value (None where the host has none: the
    variable is then left out, as Docker does)."""
    if "=" in text:
        given: tuple[str, str | None] = pair("NAME=VALUE or NAME (the host's value)")(text, name)
        return given
    if not text or not text.replace("_", "a").isalnum() or text[0].isdigit():
        raise ConfigError(f"{name}={text!r}: expected NAME=VALUE or NAME (the host's value)")
    return text, os.environ.get(text)


def env_of(items: list[tuple[str, str | None]]) -> dict[str, str]:
    return {key: value for key, value in items if value is not None}


def soft_hard(text: str) -> tuple[int | str, ...]:
    """'1024:4096' -> (1024, 4096), 'unlimited' -> ('unlimited', 'unlimited')."""
    soft, _, hard = text.partition(":")
    return tuple(v if v == "unlimited" else int(v) for v in (soft, hard or soft))


def check_image(value: Any, name: str) -> Any:
    """A reference (checked when it is pulled) or an `Image` of the store."""
    if isinstance(value, str) and value.strip() == value and value:
        return value
    if hasattr(value, "layers") and hasattr(value, "config"):
        return value
    raise ConfigError(f"{name}={value!r}: expected an image reference, e.g. 'alpine:3.20'")


def check_pull(value: Any, name: str) -> str:
    if value not in PULL_POLICIES:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(PULL_POLICIES)}")
    return str(value)


def check_entrypoint(value: Any, name: str) -> tuple[str, ...]:
    """Docker's --entrypoint is one program; run() takes an argument list too ("" or []: none)."""
    if isinstance(value, str):
        return (value,) if value else ()
    return validate.check_command(value) if value else ()
