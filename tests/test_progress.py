"""The kernel's cut counter and the per-matrix progress bar built on it."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as sc
from conftest import cuts, part
from jax_signedcut._core import progress as _progress

needs_ffi = pytest.mark.skipif(_progress.cuts_done() is None, reason="C++ extension not built")


@needs_ffi
@pytest.mark.parametrize("shape, max_error", [((40, 24), None), ((3, 33, 70), None),
                                              ((64, 48), 0.9)])
def test_counter_advances_by_the_cuts_recorded(shape, max_error):
  a = jax.random.normal(jax.random.key(0), shape)
  before = _progress.cuts_done()
  f = sc.decompose(a, key=jax.random.key(1), width=50, max_error=max_error, backend="ffi",
                   outliers=0)
  jax.block_until_ready(f)
  assert _progress.cuts_done() - before == int(np.sum(cuts(f).num_cuts))
  if max_error is not None:
    assert int(np.sum(cuts(f).num_cuts)) < 50  # the early stop is what the counter saw


@pytest.mark.parametrize("backend", [pytest.param("ffi", marks=needs_ffi), "jnp"])
def test_run_with_progress_returns_the_same_factors(backend, monkeypatch):
  a = jax.random.normal(jax.random.key(2), (96, 80))
  call = lambda: sc.decompose(a, key=jax.random.key(3), width=40, backend=backend)  # noqa: E731
  expected = call()
  bars = []

  class Recorder:  # stands in for tqdm: records what the bar was told
    def __init__(self, total, **kwargs):
      self.total, self.n, self.kwargs = total, 0, kwargs
      bars.append(self)

    def update(self, k):
      self.n += k

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

  import tqdm.auto  # noqa: PLC0415
  monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
  got = _progress.run_with_progress(call, total_cuts=40, desc="w")
  assert all(x.is_ready() for x in jax.tree.leaves(got))
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  assert len(bars) == 1 and bars[0].total == 40 and bars[0].n == 40  # the bar ends full
  assert bars[0].kwargs["desc"] == "w"
  # like the leaf bar: tqdm leaves it off when stderr is not a terminal
  assert bars[0].kwargs["disable"] is None and bars[0].kwargs["file"] is sys.stderr
  off = _progress.run_with_progress(call, total_cuts=40, desc="w", enabled=False)
  jax.tree.map(np.testing.assert_array_equal, off, expected)
