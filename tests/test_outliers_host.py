"""The host split of the leaf-by-leaf paths: the same factors as the jitted ``decompose``.

``decompose_leafwise`` and ``jax-signedcut compress`` choose the outliers on the
host and zero them in place (to keep peak memory near the kernel's working set);
every factor must stay bit-identical to ``jax.jit(decompose)`` with the same key
and budget, ties at the 0.5 % cap included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import save_file

import jax_signedcut as sc
from conftest import assert_same_factors, cuts, part
from jax_signedcut._signedcut import decompose as _decompose
from jax_signedcut._signedcut import outliers as _outliers
from jax_signedcut._core import tree as _tree
from jax_signedcut._cli import main

def assert_bit_identical(f, g):
  fl, fd = jax.tree.flatten(f)
  gl, gd = jax.tree.flatten(g)
  assert fd == gd, (fd, gd)
  for i, (a, b) in enumerate(zip(fl, gl)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
    # Bytes, not values: c and the sparse values must agree in every bit (signed zeros too).
    assert np.atleast_1d(a).tobytes() == np.atleast_1d(b).tobytes(), i


def student_t(shape, seed, planted=5):
  """Student-t (ν = 3) with a few planted huge entries: outliers under the cap."""
  rng = np.random.default_rng(seed)
  a = rng.standard_t(3, size=shape).astype(np.float32)
  flat = a.reshape(-1)
  flat[rng.choice(flat.size, min(planted, flat.size), replace=False)] = 80.0
  return a


def cauchy(shape, seed, rounded=False):
  """Cauchy entries: ~7 % beyond 6 robust σ, so the 0.5 % cap binds.

  Rounded to integers, many scores tie at the cap's boundary.
  """
  a = np.random.default_rng(seed).standard_cauchy(shape).astype(np.float32)
  return np.round(a) if rounded else a


CASES = [
    # (matrix, budget)
    (student_t((37, 53), 0), {"width": 6}),
    (student_t((3, 40, 31), 2), {"bits_per_weight": 4}),
    (student_t((50, 70), 3), {"width": 300, "max_error": 0.2}),
    (cauchy((97, 130), 5), {"rate": 0.5, "max_error": 0.05}),
    (cauchy((2, 33, 65), 6, rounded=True), {"width": 7}),
    (cauchy((40, 41), 7, rounded=True), {"width": 5, "outliers": 0.05}),
]


@pytest.mark.parametrize("a, budget", CASES,
                         ids=[f"{'x'.join(map(str, a.shape))}-{b}" for a, b in CASES])
def test_leaf_split_equals_jitted_decompose(a, budget):
  key = jax.random.key(a.size)
  want = jax.jit(lambda x: sc.decompose(x, key=key, **budget))(a)
  assert np.all(np.asarray(part(want, sc.Sparse).count) > 0)
  got = _decompose._decompose_leaf(a, key=key, **budget)  # noqa: SLF001
  assert_bit_identical(want, got)


def test_leaf_split_batched_keys_and_bf16():
  a = jnp.asarray(cauchy((2, 30, 37), 9), jnp.bfloat16)
  keys = jax.random.split(jax.random.key(3), 2)
  want = jax.jit(lambda x: sc.decompose(x, key=keys, width=6))(a)
  got = _decompose._decompose_leaf(a, key=keys, width=6)  # noqa: SLF001
  assert_bit_identical(want, got)


def test_donate_overwrites_only_when_asked():
  a = jnp.asarray(student_t((40, 50), 10))
  before = np.array(a)
  key = jax.random.key(0)
  want = sc.decompose(a, key=key, width=6)
  kept = _decompose._decompose_leaf(a, key=key, width=6)  # noqa: SLF001
  np.testing.assert_array_equal(np.asarray(a), before)
  got = _decompose._decompose_leaf(a, key=key, width=6, donate=True)  # noqa: SLF001
  assert a.is_deleted()
  assert_bit_identical(want, kept)
  assert_bit_identical(want, got)


@given(shape=st.sampled_from([(1, 1), (31, 17), (64, 40)]),
       seed=st.integers(0, 10**6), levels=st.sampled_from([0, 2, 5]),
       mode=st.sampled_from(["auto", 0.02, 0.4]))
@settings(derandomize=True, deadline=None, max_examples=10)
def test_select_host_is_extracts_choice(shape, seed, levels, mode):
  # Few shapes, so that the jitted extract compiles a dozen times at most.
  m, n = shape
  a = cauchy((m, n), seed)
  if levels:  # few distinct values: ties everywhere, a zero MAD now and then
    a = np.round(a * levels / 4) / levels
  k_max = _outliers.max_count(mode, m, n)
  _, idx, _, count = jax.jit(lambda x: _outliers.extract(x, mode, k_max))(a)
  want = np.asarray(idx)[:int(count)]
  got = _outliers.select_host(a.reshape(-1), mode, k_max, chunk=97)
  np.testing.assert_array_equal(got, want)


def test_leafwise_and_cli_equal_the_jitted_tree(tmp_path, capsys):
  params = {"dense": {"kernel": student_t((48, 40), 11), "bias": np.zeros(40, np.float32)},
            "out": cauchy((33, 64), 12)}
  key = jax.random.key(5)
  want = jax.jit(lambda p: sc.decompose(p, key=key, rate=0.5))(params)
  leafwise = sc.decompose_leafwise(params, key=key, rate=0.5, progress=False)
  for path in (("dense", "kernel"), ("out",)):
    w, g = want, leafwise
    for p in path:
      w, g = w[p], g[p]
    assert int(part(w, sc.Sparse).count) > 0
    assert_bit_identical(w, g)
  # The CLI: the same leaves, keys from the "."-joined names.
  flat = {"dense.kernel": params["dense"]["kernel"], "out": params["out"]}
  save_file(flat, str(tmp_path / "in.safetensors"))
  assert main(["compress", str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors"),
               "--rate", "0.5", "--seed", "5", "-q"]) == 0
  capsys.readouterr()
  got = sc.load(tmp_path / "o.safetensors")
  for name, a in flat.items():
    w = sc.decompose(jnp.asarray(a), key=_tree.leaf_key(key, name), rate=0.5)
    g = got[name]
    assert_same_factors(w, g)
