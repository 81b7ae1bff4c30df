"""Uniform quantizers, code packing and round-to-nearest (RTN)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_signedcut as jsc
from jax_signedcut._methods import rtn as _quantize

SHAPES = [(1, 1), (9, 1), (33, 97), (100, 7)]


@settings(derandomize=True, deadline=None, max_examples=15)
@given(bits=st.integers(1, 16), rows=st.integers(1, 3), count=st.integers(1, 130),
       seed=st.integers(0, 2**31 - 1))
def test_pack_codes_roundtrip_and_layout(bits, rows, count, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, count), dtype=np.uint32)
  words, back = _roundtrip(jnp.asarray(codes), bits)
  words = np.asarray(words)
  assert words.shape == (rows, _quantize.code_words(count, bits))
  # Readable layout oracle: code i holds bits [i*bits, (i+1)*bits) of the row's stream.
  stream = ((words[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(rows, -1)
  assert not stream[:, count * bits:].any(), "tail bits must be 0"
  expect = (stream[:, :count * bits].reshape(rows, count, bits)
            << np.arange(bits, dtype=np.uint32)).sum(-1)
  np.testing.assert_array_equal(expect, codes)
  np.testing.assert_array_equal(back, codes)


@functools.partial(jax.jit, static_argnums=1)   # one compile per example, not one per op
def _roundtrip(codes, bits):
  words = _quantize.pack_codes(codes, bits)
  return words, _quantize.unpack_codes(words, codes.shape[-1], bits)


# The symmetric int grid needs at least 2 bits (1 bit is an error, tested elsewhere).
@pytest.mark.parametrize("bits,grid", [(b, "uniform") for b in (1, 2, 3, 4, 8, 16)]
                         + [(b, "int") for b in (2, 3, 4, 8, 16)])
def test_levels_and_half_step_error(bits, grid):
  scale = jnp.float32(2.5)
  x = jnp.linspace(-2.5, 2.5, 20001, dtype=jnp.float32)
  codes = jsc.quantize(x, scale, bits=bits, grid=grid)
  levels = jsc.num_levels(bits, grid)
  assert levels <= 2**bits
  assert int(codes.max()) <= levels - 1
  y = jsc.dequantize(codes, scale, bits=bits, grid=grid)
  assert np.unique(np.asarray(y)).size <= 2**bits
  step = 2 * 2.5 / (levels - 1)
  err = float(jnp.max(jnp.abs(y - x)))
  assert err <= step / 2 * (1 + 1e-5) + 1e-6
  if grid == "int":  # the symmetric grid represents 0 exactly
    assert float(jsc.dequantize(jsc.quantize(jnp.float32(0), scale, bits=bits, grid=grid),
                                scale, bits=bits, grid=grid)) == 0.0


def test_zero_scale_gives_zero():
  for grid in ("uniform", "int"):
    y = jsc.dequantize(jsc.quantize(jnp.zeros(5), jnp.float32(0), bits=4, grid=grid),
                       jnp.float32(0), bits=4, grid=grid)
    np.testing.assert_array_equal(y, 0)


@pytest.mark.parametrize("bits", [1, 3])
def test_dithered_quantizer_is_unbiased(bits):
  # N keys: each sample of a dithered value has variance <= step**2/4, so the
  # mean over N keys is within 5 standard deviations, 5*step/(2*sqrt(N)), of
  # x (a 5-sigma tolerance; the keys are fixed, so the test is deterministic).
  n_keys = 4000
  x = jnp.linspace(-1.0, 1.0, 37, dtype=jnp.float32)
  keys = jax.random.split(jax.random.key(7), n_keys)
  step = 2.0 / (2**bits - 1)
  y = jax.vmap(lambda k: jsc.dequantize(jsc.quantize(x, 1.0, bits=bits, key=k), 1.0,
                                        bits=bits))(keys)
  assert float(jnp.max(jnp.abs(y - x[None]))) < step * (1 + 1e-5)   # a neighbouring level
  mean = jnp.mean(y, axis=0)
  tol = 5 * step / (2 * math.sqrt(n_keys))
  assert float(jnp.max(jnp.abs(mean - x))) < tol
  # And it is not just round-to-nearest: the deterministic one is biased here.
  rtn_bias = jnp.abs(jsc.dequantize(jsc.quantize(x, 1.0, bits=bits), 1.0, bits=bits) - x)
  assert float(jnp.max(rtn_bias)) > 10 * tol


def _rtn_oracle(a, bits, group_size, grid):
  """Readable NumPy RTN: absmax per row or per column group, round to the nearest level."""
  a = np.asarray(a, np.float64)
  m, n = a.shape
  g = n if group_size is None else group_size
  levels = 2**bits if grid == "uniform" else 2**bits - 1
  out = np.zeros_like(a)
  for i in range(m):
    for j0 in range(0, n, g):
      blk = a[i, j0:j0 + g]
      s = np.abs(blk).max()
      step = 2 * s / (levels - 1)
      k = np.zeros_like(blk) + (levels - 1) / 2 if s == 0 else np.round((blk + s) / step)
      out[i, j0:j0 + g] = -s + k * step
  return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,group_size,grid",
                         [(8, None, "int"), (4, 64, "int"), (2, None, "int"), (2, 16, "uniform"),
                          (3, 5, "uniform"), (1, None, "uniform")])
def test_rtn_matches_oracle_and_bit_count(shape, bits, group_size, grid):
  m, n = shape
  a = jax.random.normal(jax.random.key(m * 1000 + n), shape)
  q = jsc.rtn(a, bits=bits, group_size=group_size, grid=grid)
  got = np.asarray(jsc.dequantize_matrix(q))
  expect = _rtn_oracle(a, bits, group_size, grid)
  levels = 2**bits if grid == "uniform" else 2**bits - 1
  step = 2 * np.abs(np.asarray(a)).max() / (levels - 1)
  np.testing.assert_allclose(got, expect, atol=1e-5 * step + 1e-6)
  # Exact accounting: what is stored is what rtn_bits_per_weight says.
  assert q.nbytes * 8 == pytest.approx(jsc.rtn_bits_per_weight(m, n, bits, group_size) * m * n)
  assert q.nbytes == q.codes.size * 4 + q.scale.size * 4
  assert q.codes.dtype == jnp.uint32 and q.scale.dtype == jnp.float32


def test_rtn_jit_vmap_batch_agree():
  a = jax.random.normal(jax.random.key(3), (3, 33, 70))
  eager = [jsc.dequantize_matrix(jsc.rtn(a[i], bits=4, group_size=32)) for i in range(3)]
  batched = jsc.dequantize_matrix(jsc.rtn(a, bits=4, group_size=32))
  jitted = jax.jit(lambda x: jsc.dequantize_matrix(jsc.rtn(x, bits=4, group_size=32)))(a)
  vmapped = jax.vmap(lambda x: jsc.dequantize_matrix(jsc.rtn(x, bits=4, group_size=32)))(a)
  for out in (batched, jitted, vmapped):  # equal up to XLA's fusion of the scale arithmetic
    np.testing.assert_allclose(out, jnp.stack(eager), rtol=1e-6, atol=1e-7)
  assert jsc.rtn(a, bits=4).nbytes == 3 * jsc.rtn(a[0], bits=4).nbytes


def test_rtn_zero_matrix_and_bf16():
  np.testing.assert_array_equal(jsc.dequantize_matrix(jsc.rtn(jnp.zeros((4, 5)), bits=4)), 0)
  a = jax.random.normal(jax.random.key(0), (16, 40)).astype(jnp.bfloat16)
  err = jnp.linalg.norm(jsc.dequantize_matrix(jsc.rtn(a, bits=8)) - a.astype(jnp.float32))
  assert float(err / jnp.linalg.norm(a.astype(jnp.float32))) < 0.02


def test_rtn_errors_and_more_bits_help():
  a = jax.random.normal(jax.random.key(0), (64, 64))
  errs = [float(jnp.linalg.norm(jsc.dequantize_matrix(jsc.rtn(a, bits=b)) - a)) for b in (2, 4, 8)]
  assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bits=0), ValueError, "bits must be in 2..16"),
    (dict(bits=17), ValueError, "bits must be in 2..16"),
    (dict(bits=1), ValueError, "bits must be in 2..16"),
    (dict(bits=0, grid="uniform"), ValueError, "bits must be in 1..16"),
    (dict(bits=4.0), TypeError, "bits must be an int"),
    (dict(bits=4, group_size=0), ValueError, "group_size"),
    (dict(bits=4, grid="nf4"), ValueError, "grid must be one of"),
])
def test_rtn_bad_arguments(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    jsc.rtn(jnp.ones((4, 4)), **kwargs)


def test_rtn_bad_inputs():
  with pytest.raises(TypeError, match="dtype int32"):
    jsc.rtn(jnp.ones((4, 4), jnp.int32), bits=4)
  with pytest.raises(ValueError, match="non-finite"):
    jsc.rtn(jnp.array([[1.0, jnp.nan]]), bits=4)
  with pytest.raises(ValueError, match="ndim >= 2"):
    jsc.rtn(jnp.ones(4), bits=4)


def test_int_grid_refuses_one_bit():
  with pytest.raises(ValueError, match=r"bits must be in 2..16 .*int grid.*got 1"):
    jsc.quantize(jnp.ones(4), jnp.float32(1.0), bits=1, grid="int")
  with pytest.raises(ValueError, match=r"got 1"):
    jsc.rtn(jnp.ones((4, 4)), bits=1)
