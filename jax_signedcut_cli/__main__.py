"""``python -m jax_signedcut_cli``: the ``jax-signedcut`` command."""

import sys

from jax_signedcut_cli import main

sys.exit(main())
