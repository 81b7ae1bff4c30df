"""Property-based tests (hypothesis, fixed seed, bounded): generated shapes and value
distributions through every kernel against the oracle and the numeric contract."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import cuts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_signedcut as sc
from jax_signedcut._kernels import extension as _extension
from jax_signedcut._signedcut import oracle, start

KEY = jax.random.key(0)
F32_MAX = float(np.finfo(np.float32).max)
# Few examples and small shapes from a short list (each new shape compiles).
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
SHAPES = [(1, 5), (7, 1), (17, 9), (33, 31)]
KINDS = ["gauss", "zeros", "const", "huge", "tiny", "subnormal", "heavy", "one_huge", "ints"]


def _matrix(kind, shape, seed):
  rng = np.random.default_rng(seed)
  g = rng.standard_normal(shape)
  if kind == "zeros":
    a = np.zeros(shape)
  elif kind == "const":
    a = np.full(shape, rng.choice([-3.0, 0.5, 1e30]))
  elif kind == "huge":
    a = g * 1e37
  elif kind == "tiny":
    a = g * 1e-30
  elif kind == "subnormal":
    a = g * 1e-40
  elif kind == "heavy":
    a = rng.standard_t(1.2, shape)
  elif kind == "one_huge":
    a = g.copy()
    a.flat[rng.integers(a.size)] = 3e38
  elif kind == "ints":
    a = np.round(g * 4)
  else:
    a = g
  return np.clip(a, -F32_MAX, F32_MAX).astype(np.float32)


def _backends():
  return ["jnp"] + (["ffi"] if _extension.available() else [])


@SETTINGS
@given(kind=st.sampled_from(KINDS), shape=st.sampled_from(SHAPES), seed=st.integers(0, 9))
def test_contract_every_backend(kind, shape, seed):
  a = _matrix(kind, shape, seed)
  width = 6
  results = {}
  for b in _backends():
    with pytest.warns(UserWarning) if kind == "subnormal" and a.any() else _nowarn():
      f = sc.decompose(a, key=KEY, width=width, backend=b, outliers=0)
    c = np.asarray(f.c)
    assert np.all(np.isfinite(c)) and np.all(c >= 0), (b, c)
    assert int(f.num_cuts) == width
    err = float(sc.relative_error(a, f))
    assert np.isfinite(err) and err <= 1 + 1e-5, (b, err)
    # Prefix consistency: the first 3 cuts are the width-3 run.
    with _ignore():
      g = sc.decompose(a, key=KEY, width=3, backend=b, outliers=0)
    np.testing.assert_array_equal(np.asarray(f.c)[:3], np.asarray(g.c))
    np.testing.assert_array_equal(np.asarray(f.s_bits)[:3], np.asarray(g.s_bits))
    results[b] = f
  if "ffi" in results:
    f, g = results["ffi"], results["jnp"]
    if kind in ("ints", "zeros", "const"):
      # Exact sums in both: the first cut agrees bit for bit.
      np.testing.assert_array_equal(np.asarray(f.c)[:1], np.asarray(g.c)[:1])
      np.testing.assert_array_equal(np.asarray(f.s_bits)[:1], np.asarray(g.s_bits)[:1])


@settings(SETTINGS, max_examples=4)
@given(kind=st.sampled_from(["gauss", "huge", "one_huge", "heavy"]),
       shape=st.sampled_from(SHAPES), seed=st.integers(0, 9))
def test_max_error_backends_agree_within_one_cut(kind, shape, seed):
  a = _matrix(kind, shape, seed)
  counts = []
  for b in _backends():
    f = sc.decompose(a, key=KEY, width=8, max_error=0.3, backend=b)
    counts.append(int(cuts(f).num_cuts))
    assert np.all(np.isfinite(np.asarray(cuts(f).c)))
  assert max(counts) - min(counts) <= 1, counts


@pytest.mark.skipif(not _extension.available(), reason="needs the compiled extension")
@SETTINGS
@given(kind=st.sampled_from(KINDS), shape=st.sampled_from(SHAPES), seed=st.integers(0, 9))
def test_kernel_impls_bit_identical(kind, shape, seed):
  from jax_signedcut._kernels import greedy as _greedy  # noqa: PLC0415
  impls = ["scalar"] + (["avx512"] if _greedy.avx512_supported() else [])
  a = _matrix(kind, shape, seed)[None]
  # The scaled input the kernel sees in decompose (max in [1, 2) for extreme kinds).
  from jax_signedcut._core import scaling  # noqa: PLC0415
  k = scaling.exponent(a)
  a = scaling.ldexp(a, -k[:, None, None])
  words = start.start_words(KEY, 5, shape[1])
  out = [jax.tree.map(np.asarray, _greedy.greedy(a, words, impl=i)) for i in impls]
  for o in out[1:]:
    for x, y in zip(out[0], o):
      np.testing.assert_array_equal(x, y)
  # And against the oracle: finite, the same number of cuts, close errors.
  ref = oracle.greedy(a[0], words)
  assert np.all(np.isfinite(out[0][2]))
  assert int(out[0][3][0]) == int(ref[3])


class _nowarn:
  def __enter__(self):
    import warnings  # noqa: PLC0415
    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("error", UserWarning)

  def __exit__(self, *exc):
    return self._w.__exit__(*exc)


class _ignore(_nowarn):
  def __enter__(self):
    import warnings  # noqa: PLC0415
    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("ignore")
