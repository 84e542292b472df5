"""What a sandboxed body's call raised besides its report, for the worker to replay as it
would have come in process (see `sandbox`): its warnings, and whether the capture was on.

In the body, a warning must reach what it would reach in process, the recorder active when
the call began (pytest's, whose copy here is lost with the body, or the test's own `recwarn`,
which the test may read), and also be kept for the worker, which replays it into its own
recorder (pytest's warnings summary, or its `recwarn`). A recorder the test enters itself
(`pytest.warns`, `catch_warnings(record=True)`) takes the warnings before us, as in process.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def kept_and_passed_on() -> Iterator[list[warnings.WarningMessage]]:
    # catch_warnings(record=True) sets this private hook to its list's append; replacing it
    # is the one way to see a warning and still let it through to the recorder underneath
    module: Any = warnings
    underneath = module._showwarnmsg_impl
    recorder = isinstance(getattr(underneath, "__self__", None), list)
    kept: list[warnings.WarningMessage] = []

    def keep(message: warnings.WarningMessage) -> None:
        kept.append(message)
        if recorder:  # not printed: the worker's replay prints what it shows
            underneath(message)
    with warnings.catch_warnings():  # restores the hook, and the filters a test changed
        module._showwarnmsg_impl = keep
        yield kept


def capture_on(config: Any) -> bool:
    """Whether pytest's global capture takes this process's output now (the `subtests`
    fixture suspends it around its reports, unittest's subTest does not). The capture
    manager says how it captures, not whether it is suspended: its MultiCapture's state."""
    capman = config.pluginmanager.getplugin("capturemanager")
    state = getattr(getattr(capman, "_global_capturing", None), "_state", None)
    return bool(state == "started")
