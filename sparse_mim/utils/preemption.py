"""Pre-emption: stop cleanly on SIGTERM / SIGUSR1 with a checkpoint, then exit with a "requeue me" status.

Clusters stop jobs with SIGTERM (Slurm's ``--signal=USR1@180`` sends USR1 a few minutes
before the time limit; ``scancel`` and pre-emption send TERM, then KILL after a grace
period). Both trainers use one ``PreemptionGuard``::

    with PreemptionGuard() as guard:
        for step in ...:
            train_step()
            if guard.should_stop():     # collective: every rank gets the same answer
                save_checkpoint(...)
                break
    # the CLI then exits with PREEMPTED_EXIT_CODE

The handler only sets a flag, so the current optimizer step finishes normally (no
half-applied update, no torn checkpoint). ``should_stop`` all-reduces the flag (MAX)
over the process group, so a signal delivered to one rank stops every rank after the
same step and they write one consistent checkpoint. The exit status
``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL``: "try again later") tells a batch script to
requeue the job (see ``docs/slurm_pretrain.sh``); ``resume=auto`` continues it.

Ctrl-C (SIGINT) is a stop too: the first one says so on stderr, the current step finishes and
``last.pth`` is written (exit status ``INTERRUPTED_EXIT_CODE``, 130, no requeue); a second Ctrl-C
aborts at once (``KeyboardInterrupt``; an atomic write in flight leaves the previous file intact).
Data-loader workers forked while the guard is active inherit the handler and ignore the signal
(the main process decides), so the first Ctrl-C does not kill them mid-epoch.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Iterable

import torch

__all__ = ["PREEMPTED_EXIT_CODE", "INTERRUPTED_EXIT_CODE", "PREEMPTION_SIGNALS", "PreemptionGuard", "stop_exit_code"]

PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def stop_exit_code(signal_name: str | None) -> int:
    """Exit status of a run stopped by ``signal_name``: 130 for Ctrl-C (no requeue), else 75 (requeue)."""
    return INTERRUPTED_EXIT_CODE if signal_name == "SIGINT" else PREEMPTED_EXIT_CODE
PREEMPTION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class PreemptionGuard:
    """Context manager installing SIGTERM / SIGUSR1 handlers that request a clean stop.

    ``requested``: this process received a signal. ``should_stop()``: any rank did (a
    collective call: every rank must call it at the same point, e.g. after each optimizer
    step). ``signal_name``: the first signal received. Handlers are restored on exit.
    Outside the main thread (where Python cannot install handlers) the guard is inert.
    """

    def __init__(self, signals: Iterable[int] = PREEMPTION_SIGNALS, enabled: bool = True, interrupt: bool = True,
                 what: str = "last.pth"):
        self.signals = tuple(signals)
        self.enabled = enabled
        self.interrupt = interrupt
        self.what = what
        self.requested = False
        self.interrupted = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def _handle_interrupt(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if os.getpid() != self._pid:  # a forked data-loader worker: the main process decides
            return
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self._handle(signum, frame)
        print(f"\ninterrupted (Ctrl-C): finishing the current step, then writing {self.what}; "
              "press Ctrl-C again to abort at once (the steps since the last checkpoint are then lost)",
              file=sys.stderr, flush=True)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True

    def __enter__(self) -> "PreemptionGuard":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
            if self.interrupt and signal.SIGINT not in self.signals:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def request(self, reason: str = "request") -> None:
        """Ask for a stop from code (tests, a watchdog)."""
        self.requested = True
        self.signal_name = self.signal_name or reason

    def should_stop(self, device: torch.device | str | None = None) -> bool:
        """True on every rank if any rank was signalled (all-reduce MAX; local flag with one process)."""
        from .distributed import any_rank
        stop = any_rank(self.requested, device)
        if stop and not self.requested:
            self.requested, self.signal_name = True, "signal on another rank"
        return stop
