"""Test configuration (tests/ and the docstring examples in jax_signedcut/):
strict JAX numerics settings, as in equinox's suite."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


import os

import pytest


def _mappings() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:
    return -1


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs(request):
  """Drops JAX's compiled programs after each test module.

  XLA:CPU maps a few pages per compiled kernel, and they stay mapped as long
  as the program is cached. The suite compiles thousands of programs; kept
  alive they exhaust the kernel's per-process mapping limit
  (``vm.max_map_count``, 65530), after which compilation fails -- and the
  failure itself crashes inside libgcc's unwinder.
  """
  yield
  jax.clear_caches()
  if os.environ.get("JAX_SIGNEDCUT_TRACE_MAPS"):
    with open(os.environ["JAX_SIGNEDCUT_TRACE_MAPS"], "a") as f:
      f.write(f"{request.node.nodeid} {_mappings()}\n")
