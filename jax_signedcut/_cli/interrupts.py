"""Ctrl-C (SIGINT) on the command line: never swallowed, one line, a non-zero exit.

Python turns SIGINT into a ``KeyboardInterrupt`` at the next bytecode, which
code run from a destructor, a callback or interpreter shutdown can swallow.
The handler here also records that the signal came: the output is not renamed
into place after one (:func:`commit`), :func:`jax_signedcut._cli.main.main`
exits with 130 even when the exception was lost, and a SIGINT after the work
is done (while the process shuts down) ends it at once with the same line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from jax_signedcut._checkpoint import writer as _writer


class _State:
  seen = False        # a SIGINT came
  committed = None    # the output renamed into place, if any
  resumable = None    # a directory whose finished leaves a rerun resumes from, if any
  finished = False    # main() returned: the process is shutting down
  reported = False    # the one line was printed


STATE = _State()


def message() -> str:
  if STATE.committed:
    return f"jax-signedcut: interrupted; {STATE.committed} was complete and is kept"
  if STATE.resumable:
    return (f"jax-signedcut: interrupted; the leaves finished so far are kept in "
            f"{STATE.resumable} and the same command resumes from them")
  return "jax-signedcut: interrupted; no output was written"


def report() -> None:
  """Prints the one line (once)."""
  if not STATE.reported:
    STATE.reported = True
    print(message(), file=sys.stderr, flush=True)


def _handler(signum, frame):
  STATE.seen = True
  if STATE.finished:   # shutting down: no Python code may be left to raise into
    if not STATE.reported:
      STATE.reported = True
      with contextlib.suppress(OSError):
        os.write(2, (message() + "\n").encode())
    os._exit(130)
  raise KeyboardInterrupt


def install():
  """Installs the handler (main thread only); returns the previous one, or None."""
  STATE.seen, STATE.committed, STATE.finished, STATE.reported = False, None, False, False
  STATE.resumable = None
  if threading.current_thread() is not threading.main_thread():
    return None
  if not getattr(sys.unraisablehook, "_signedcut_quiet", False):
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  return signal.signal(signal.SIGINT, _handler)


def _quiet_unraisable(previous):
  """An unraisable-exception hook that drops the KeyboardInterrupts of our handler.

  A SIGINT that lands in a destructor or a GC callback (jax has one) cannot
  propagate, and Python would print "Exception ignored in ..." and a traceback.
  The handler has already recorded it (``STATE.seen``), so the run still ends
  with the one line; other unraisable exceptions go to the previous hook.
  """
  def hook(unraisable):
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and STATE.seen:
      return
    previous(unraisable)
  hook._signedcut_quiet = True
  return hook


def check() -> None:
  """Raises KeyboardInterrupt if a SIGINT came (even one whose exception was swallowed)."""
  if STATE.seen:
    raise KeyboardInterrupt


@contextlib.contextmanager
def commit(path):
  """Around the rename of an output into place: not after a SIGINT, and not torn by one.

  A SIGINT during the rename is held until the output is recorded as complete
  (:data:`STATE.committed`), so the one line says that it was kept.
  """
  check()
  with _writer.deferred_interrupts():
    yield
    STATE.committed = os.fspath(path)
