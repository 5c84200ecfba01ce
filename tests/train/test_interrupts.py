"""The signal plumbing of the training loop: a step's commit block is never cut in half."""

from __future__ import annotations

import os
import signal

import pytest

from peftkit.train.interrupts import ENV_HOOK, deferred_interrupts, interrupt_hook, sigterm_as_interrupt


def test_ctrl_c_inside_the_block_is_raised_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("update")  # runs: the signal is held
            done.append("counter")
    assert done == ["update", "counter"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigterm_inside_the_block_is_raised_as_an_interrupt_when_it_ends():
    done = []
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("counter")
    assert done == ["counter"]


def test_no_signal_no_interrupt_and_an_error_inside_wins():
    with deferred_interrupts():
        pass
    with pytest.raises(ValueError), deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        raise ValueError("the block's own error is not replaced")


def test_an_ignored_signal_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_hook_sends_sigint_at_the_chosen_step_and_phase(monkeypatch):
    monkeypatch.setenv(ENV_HOOK, "2:optimizer_step")
    hook = interrupt_hook()
    hook(2, "forward")
    hook(1, "optimizer_step")
    with pytest.raises(KeyboardInterrupt):
        hook(2, "optimizer_step")


@pytest.mark.parametrize("value", ["two:forward", "2", "2:backward"])
def test_hook_rejects_a_malformed_point(value, monkeypatch):
    monkeypatch.setenv(ENV_HOOK, value)
    with pytest.raises(ValueError, match=f"{ENV_HOOK}={value!r}: expected <step>:<phase>"):
        interrupt_hook()
