"""The one place that imports the compiled extension and registers its FFI handlers.

Every other module asks here: :func:`module` gives the extension (or None
when this install has none), :func:`has_target` whether a handler is built in.
Registration happens once per process, at the first look-up (registering a
target twice with another capsule breaks the next computation). On a CPU
install without the extension every kernel falls back to its portable
``jnp`` path; that is 20× slower or more, so it is said once, as a warning
naming how to build it.
"""

from __future__ import annotations

import functools
import warnings

import jax

MISSING_HINT = ("the compiled extension jax_signedcut._signedcut_ffi is missing, so the "
                "portable jnp kernels run instead (much slower on CPU); build it with "
                "`pip install -e .` (needs a C++17 compiler and CMake)")


@functools.cache
def module():
  """The extension module with its handlers registered for CPU, or None if it is not built."""
  try:
    from jax_signedcut import _signedcut_ffi  # noqa: PLC0415
  except ImportError:
    if jax.default_backend() == "cpu":
      warnings.warn(MISSING_HINT, RuntimeWarning, stacklevel=3)
    return None
  for name, capsule in _signedcut_ffi.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  return _signedcut_ffi


def available() -> bool:
  """Whether the extension is built (and its handlers registered)."""
  return module() is not None


def has_target(name: str) -> bool:
  """Whether the extension provides the FFI target ``name``."""
  ext = module()
  return ext is not None and name in ext.registrations()


def on_platform(*args, cpu, default):
  """``cpu(*args)`` where the computation lowers for CPU and the extension exists, else
  ``default(*args)``: decided at lowering time (``jax.lax.platform_dependent``), not from
  global state at trace time. A GPU kernel goes here as one more branch."""
  if not available():
    return default(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default)
