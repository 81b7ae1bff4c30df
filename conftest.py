"""Test configuration (tests/ and the docstring examples in jax_signedcut/):
strict JAX numerics settings, as in equinox's suite."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


import os
import shutil
import tempfile

import pytest

# A compilation cache on disk for this test run only. The suite is bound by
# XLA:CPU compilation (1–2 s per new shape of `decompose`), and the module
# fixture below drops every compiled program after each module, so programs
# that several modules share (and both xdist workers compile) would be compiled
# again and again; from the disk they are loaded instead. The same executables
# either way: only compile time changes. The controller makes the directory and
# hands it to the workers through the environment; it is removed at the end.
# JAX_SIGNEDCUT_TEST_CACHE=0 turns it off.
_CACHE_ENV = "JAX_SIGNEDCUT_TEST_CACHE_DIR"
if os.environ.get("JAX_SIGNEDCUT_TEST_CACHE", "1") != "0":
  if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="jax_signedcut_test_cache_")
    _OWN_CACHE = True
  else:
    _OWN_CACHE = False
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
else:
  _OWN_CACHE = False


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ.get(_CACHE_ENV, ""), ignore_errors=True)


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
