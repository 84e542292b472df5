"""Sizes as users write them: '64M' -> 67108864, with docker's units (powers of 1024).

Its own module because a value takes it as well as a check: `spec.Mount.tmpfs(size='16M')`
parses when it is made, and the checks (`validate`) and the CLI parse the same text.
"""

from __future__ import annotations

import re

from pytest_minictr.errors import ConfigError

MAX_SIZE = 2 ** 62                 # bytes; the cgroup and tmpfs parsers stop near 2**63

_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    for _suffix in (_letter, _letter + "b", _letter + "ib"):
        _SIZE_UNITS[_suffix] = 1024 ** _power
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, name: str = "size") -> int:
    """'64M' -> 67108864. Units are powers of 1024, like docker's: B, K, M, G, T (KB, KiB ok)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{name}={value!r}: expected bytes as an int or a string like '64M'")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{name}={value!r}: not a size (use e.g. '512K', '64M', '1G')")
        unit = match.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"{name}={value!r}: unknown unit {match.group(2)!r} (use K, M, G)")
        size = _scaled(match.group(1), _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{name}={value!r}: must be positive")
    if size > MAX_SIZE:
        raise ConfigError(f"{name}={value!r}: must be at most 2**62 bytes ({MAX_SIZE})")
    return size


def _scaled(number: str, unit: int) -> int:
    """'1.5' * 1024 in integers, rounded down: a float would round byte counts past 2**53
    and overflow to infinity on a long digit string."""
    whole, _, fraction = number.partition(".")
    if len(whole.lstrip("0")) > 24:  # far past MAX_SIZE; int() refuses 4300+ digits anyway
        return MAX_SIZE + 1
    fraction = fraction[:24]  # below a byte even in terabytes
    # lstrip: int() counts leading zeros against its 4300-digit limit too
    scale: int = 10 ** len(fraction)  # (typeshed: int ** int may be a float)
    return int((whole + fraction).lstrip("0") or "0") * unit // scale

