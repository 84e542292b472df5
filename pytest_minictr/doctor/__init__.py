"""`minictr doctor`: what this host lets minictr do (`checks`), with a rehearsal of the default
container's setup in throwaway processes (`rehearsal`)."""

from pytest_minictr.doctor.checks import (
    Finding,
    Host,
    Rehearsal,
    examine,
    header,
    main,
    problem_text,
    ready,
    render,
    to_json,
)

__all__ = ["Finding", "Host", "Rehearsal", "examine", "header", "main", "problem_text", "ready",
           "render", "to_json"]
