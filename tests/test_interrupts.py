"""Ctrl-C that cannot be lost (personalize/interrupts.py): a KeyboardInterrupt that Python raises inside a
finalizer is printed as "ignored" and the command would go on training every queued run."""

from __future__ import annotations

import os
import signal

import pytest

from fedsens.personalize import interrupts


class _InterruptedWhileCollected:
    """An object whose finalizer is where Ctrl-C lands: the KeyboardInterrupt raised there is swallowed."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_in_a_finalizer_is_raised_again_where_runs_and_rounds_start():
    before = signal.getsignal(signal.SIGINT)  # what this process had (SIG_IGN in a background job)
    with interrupts.handled():
        _InterruptedWhileCollected()  # collected at once; its KeyboardInterrupt never reaches this frame
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()  # what the run loops call before each run and round
    interrupts.check()  # outside the block nothing is pending, and the previous handlers are back
    assert signal.getsignal(signal.SIGINT) == before


def test_sigterm_stops_a_command_as_ctrl_c_does():
    with interrupts.handled(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass


class _RayThatMustNotWait:
    """Stands in for the ray module: any wait means the loop went on past a pending Ctrl-C."""

    def wait(self, refs, **kwargs):
        raise AssertionError("the Ray loop waited for a task after Ctrl-C")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_ray_loop_raises_a_swallowed_ctrl_c_before_it_waits_again():
    from fedsens.sensitivity.ray_executor import _wait_all

    with interrupts.handled():
        _InterruptedWhileCollected()
        with pytest.raises(KeyboardInterrupt):  # run_ray then cancels every task still queued
            _wait_all(_RayThatMustNotWait(), {"ref": "job"}, events=None, driver=None, outcome={})
