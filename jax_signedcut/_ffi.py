"""Loads the compiled extension and registers its XLA FFI handlers once."""

from __future__ import annotations

import jax

from jax_signedcut import _signedcut_ffi

for _name, _capsule in _signedcut_ffi.registrations().items():
  jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def greedy(a, words, *, max_error):
  raise NotImplementedError("the C++ decomposition kernel is not built yet; use backend='jnp'")
