"""``python -m jax_signedcut._cli``."""

import contextlib
import sys

from jax_signedcut._cli.main import main

with contextlib.suppress(BrokenPipeError):
  sys.exit(main())
