"""The ``jax-signedcut`` command (compress, expand, inspect).

``main.py`` holds the parser and :func:`main`; ``args.py`` the budget, rule
and method arguments; ``sources.py`` the dense inputs; ``compress.py``,
``expand.py`` and ``inspect.py`` one command each; ``table.py`` and
``measure.py`` the summary table and its errors.
"""

from jax_signedcut._cli.args import parse_budget as parse_budget
from jax_signedcut._cli.main import main as main
