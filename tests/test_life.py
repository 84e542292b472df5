"""The launcher's life table (launcher/life.py), read as the launcher's server uses it: each
container's `Life` moves only by `NEXT_LIFE`, and the life it ended in says how the caller is
told (`ENDED_BY`, `WE_KILLED`). Pure logic: no process, no kernel."""

from __future__ import annotations

import itertools

import pytest

from pytest_minictr.host.cgroups.null import NullCgroup
from pytest_minictr.launcher.life import (
    ENDED_BY,
    NEXT_LIFE,
    WE_KILLED,
    Container,
    Happening,
    Life,
)

R, S, K, T, C, E = (Life.RUNNING, Life.STOPPING, Life.KILLED_AT_STOP, Life.TIMED_OUT,
                    Life.OUT_OF_CPU, Life.ENDED)
STOP, KILL, TIME_UP, CPU, TOLD = (Happening.STOP_ASKED, Happening.KILL_ASKED, Happening.TIME_UP,
                                  Happening.CPU_TIME_UP, Happening.END_TOLD)

# The whole machine, written out again here: the life after each happening, by life.
EXPECTED = {
    R: {STOP: S, KILL: K, TIME_UP: T, CPU: C, TOLD: E},
    S: {STOP: S, KILL: K, TIME_UP: K, CPU: K, TOLD: E},  # a stop came first: it ended it
    K: {STOP: K, KILL: K, TIME_UP: K, CPU: K, TOLD: E},
    T: {STOP: T, KILL: T, TIME_UP: T, CPU: T, TOLD: E},  # a stop after the limit: the limit's
    C: {STOP: C, KILL: C, TIME_UP: C, CPU: C, TOLD: E},  # the first limit reached ended it
    E: {STOP: E, KILL: E, TIME_UP: E, CPU: E, TOLD: E},
}
EVERY_PAIR = list(itertools.product(Life, Happening))


def a_container(life: Life = Life.RUNNING) -> Container:
    container = Container(id="c1", pid=10, pidfd=3, init_pidfd=4, status_pipe=5, events=6,
                          started=0.0, timeout_at=None, cgroup=NullCgroup("c1"))
    container.life = life
    return container


def test_every_life_and_happening_is_written_out_here():
    assert {(life, happening) for life in EXPECTED for happening in EXPECTED[life]} \
        == set(EVERY_PAIR)


@pytest.mark.parametrize(("life", "happening"), EVERY_PAIR,
                         ids=[f"{life.name}-{happening.name}" for life, happening in EVERY_PAIR])
def test_advance_moves_as_the_table_says_and_returns_the_life_before(life, happening):
    container = a_container(life)
    assert container.advance(happening) is life
    assert container.life is EXPECTED[life][happening]


def test_the_table_lists_moves_only_and_a_pair_it_leaves_out_changes_nothing():
    listed = {pair for pair in EVERY_PAIR if EXPECTED[pair[0]][pair[1]] is not pair[0]}
    # the end told once more is listed (every life's END_TOLD is) and is no move
    assert set(NEXT_LIFE) - listed == {(E, TOLD)}
    assert listed <= set(NEXT_LIFE)
    for pair in set(EVERY_PAIR) - set(NEXT_LIFE):
        assert EXPECTED[pair[0]][pair[1]] is pair[0], pair


def test_the_end_is_final():
    container = a_container(Life.ENDED)
    for happening in [*Happening, *Happening]:
        container.advance(happening)
        assert container.ended and container.life is Life.ENDED


def test_telling_the_end_ends_every_life():
    for life in Life:
        container = a_container(life)
        container.advance(Happening.END_TOLD)
        assert container.ended


def test_only_the_end_told_leads_to_the_end():
    assert {pair for pair, after in NEXT_LIFE.items() if after is Life.ENDED} \
        == {(life, Happening.END_TOLD) for life in Life}


def test_no_move_goes_back_to_running_or_to_stopping_from_a_kill():
    assert Life.RUNNING not in NEXT_LIFE.values()
    assert {life for (life, _), after in NEXT_LIFE.items() if after is Life.STOPPING} == {R}


def test_every_life_is_reachable_from_running():
    reached, frontier = {Life.RUNNING}, [Life.RUNNING]
    while frontier:
        life = frontier.pop()
        for happening in Happening:
            after = NEXT_LIFE.get((life, happening), life)
            if after not in reached:
                reached.add(after)
                frontier.append(after)
    assert reached == set(Life)


def test_every_life_a_container_can_end_in_says_how_it_ended():
    """The server looks up ENDED_BY with the life before END_TOLD: any life but ENDED."""
    assert set(ENDED_BY) == set(Life) - {Life.ENDED}
    assert ENDED_BY == {R: None, S: "stop", K: "stop", T: "timeout", C: "cpu_time"}


def test_we_killed_are_the_lives_where_the_launcher_sent_sigkill():
    assert WE_KILLED == {K, T, C}
    # reached only by a kill, a time limit, or a time limit during a stop's grace
    assert {after for (_, happening), after in NEXT_LIFE.items()
            if happening in (KILL, TIME_UP, CPU)} == WE_KILLED


@pytest.mark.parametrize(("happenings", "ended_in", "told"), [
    ((), R, None),                          # the command exited by itself
    ((STOP,), S, "stop"),                   # SIGTERM, and it exited within the grace period
    ((STOP, KILL), K, "stop"),              # the grace period ran out
    ((STOP, TIME_UP), K, "stop"),           # the time limit fell within the grace period
    ((KILL,), K, "stop"),                   # stop without grace
    ((TIME_UP,), T, "timeout"),
    ((TIME_UP, STOP), T, "timeout"),        # a stop after the limit changes nothing
    ((TIME_UP, KILL, STOP), T, "timeout"),
    ((STOP, STOP), S, "stop"),              # a second stop
    ((CPU,), C, "cpu_time"),                # its cgroup used its CPU time
    ((CPU, TIME_UP), C, "cpu_time"),        # the wall time ran out while it was being killed
    ((STOP, CPU), K, "stop"),               # out of CPU during a stop's grace: stop ended it
])
def test_a_container_s_story_ends_as_the_caller_is_told(happenings, ended_in, told):
    container = a_container()
    for happening in happenings:
        container.advance(happening)
    assert container.advance(Happening.END_TOLD) is ended_in
    assert ENDED_BY[ended_in] == told
    assert container.ended
