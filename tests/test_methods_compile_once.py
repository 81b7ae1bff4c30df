"""A second call with the same shapes and configuration compiles nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jax_signedcut as jsc
from jax_signedcut._methods import attention as _attention
from jax_signedcut._methods import lp_lowrank as _lp_lowrank
from jax_signedcut._methods import lplr as _lplr
from jax_signedcut._methods import rtn as _quantize
from jax_signedcut._signedcut import tensor as _tensor


def _twice(jitted, call):
  call(0)
  before = jitted._cache_size()
  call(1)
  assert jitted._cache_size() == before


def test_second_call_does_not_recompile():
  a = jax.random.normal(jax.random.key(0), (2, 9, 7))
  _twice(_quantize._rtn, lambda i: jsc.rtn(a + i, bits=4, group_size=4))
  _twice(_lplr._lplr, lambda i: jsc.lplr(a + i, key=jax.random.key(i), rank=3, bits=(4, 4)))
  _twice(_lplr._dsvd, lambda i: jsc.dsvd(a + i, rank=3, bits=(4, 4)))
  _twice(_lp_lowrank._lp_lowrank, lambda i: jsc.lp_lowrank(a + i, rank=2, p=1.0, iters=2))
  t = jax.random.normal(jax.random.key(1), (3, 4, 5))
  _twice(_tensor._decompose_tensor,
         lambda i: jsc.decompose_tensor(t + i, key=jax.random.key(i), width=3))
  x = jnp.zeros((9, 9))
  _twice(_attention._fit, lambda i: jsc.fit_attention(a[0].T, a[1].T, a[1].T, a[0].T + i, x0=x,
                                                      y0=x, iters=1))
