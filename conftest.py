"""Test configuration (tests/ and the docstring examples in jax_signedcut/):
strict JAX numerics settings, as in equinox's suite."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
