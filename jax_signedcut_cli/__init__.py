"""The ``jax-signedcut`` console entry point.

It lives outside the ``jax_signedcut`` package on purpose: importing anything
inside the package imports JAX first (a second or more), and a Ctrl-C in that
time used to end the command with a Python traceback. Here the import happens
inside :func:`main` with SIGINT held, so a Ctrl-C at any moment ends the run with the command's
one line and exit status 130 (:mod:`jax_signedcut._cli.interrupts` takes over
once the command runs).
"""

from __future__ import annotations

import signal
import sys

_INTERRUPTED = "jax-signedcut: interrupted; no output was written"


def main() -> int:
  """Runs ``jax-signedcut`` with ``sys.argv``; returns the exit status."""
  # A SIGINT during the import is held until the import is done: raised inside
  # jaxlib's extension initialisation it would come out as an ImportError.
  seen = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
  try:
    from jax_signedcut._cli.main import main as cli_main
  finally:
    signal.signal(signal.SIGINT, previous)
  if seen:
    print(_INTERRUPTED, file=sys.stderr, flush=True)
    return 130
  try:
    return cli_main()
  except KeyboardInterrupt:   # before the command's own handler was installed
    print(_INTERRUPTED, file=sys.stderr, flush=True)
    return 130
