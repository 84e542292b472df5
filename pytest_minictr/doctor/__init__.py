"""`minictr doctor`: what this host lets minictr do (`checks`), read through one `Host`
(`host`), with a rehearsal of the default container's setup in throwaway processes
(`rehearsal`)."""

from pytest_minictr.doctor.checks import (
                                          Finding,
                                          examine,
                                          header,
                                          main,
                                          problem_text,
                                          ready,
                                          render,
                                          to_json,
)
from pytest_minictr.doctor.host import Host, Rehearsal

__all__ = ["Finding", "Host", "Rehearsal", "examine", "header", "main", "problem_text", "ready",
           "render", "to_json"]
