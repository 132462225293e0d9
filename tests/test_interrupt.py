"""SIGINT/SIGTERM handling in-process, with real signals to this process (ekd_jax.interrupt): what a
signal does in each phase of a run. The end-to-end stops, resumes and exit statuses of the command line
are in tests/test_train.py (one process) and tests/test_multihost.py (one of two processes signalled)."""

import os
import signal
import threading
import time

import pytest

from ekd_jax import interrupt


def _send(sig) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread: give it a few


def test_before_training_a_signal_stops_at_once():
    with interrupt.StopSignals():
        with pytest.raises(interrupt.Interrupted) as e:
            _send(signal.SIGTERM)
    assert e.value.exit_status == 143 and "before training started" in e.value.message
    assert isinstance(e.value, KeyboardInterrupt)  # no `except Exception` on the way up swallows it


def test_while_training_the_first_signal_asks_the_second_stops():
    with interrupt.StopSignals() as stop:
        stop.phase = "training"
        assert stop.poll() == 0
        _send(signal.SIGINT)  # no exception: the loop is told at its next step boundary
        assert stop.poll() == signal.SIGINT and stop.stopped_by == signal.SIGINT
        stop.saving = 57
        with pytest.raises(interrupt.Interrupted) as e:
            _send(signal.SIGTERM)
    assert e.value.exit_status == 143  # the signal that stopped it at once
    assert "step 57" in e.value.message and "previous checkpoint" in e.value.message


def test_handlers_are_restored_and_other_threads_left_alone():
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    with interrupt.StopSignals():
        assert all(signal.getsignal(s) != before[s] for s in interrupt.SIGNALS)
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before

    seen = {}

    def in_thread():  # signal.signal is only allowed in the main thread: a run there keeps the defaults
        with interrupt.StopSignals() as stop:
            seen["installed"] = bool(stop._previous)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == {"installed": False}


def test_resume_message():
    assert interrupt.resume_message(25, 2) == "interrupted at step 25 (epoch 3); run the same command to resume"
