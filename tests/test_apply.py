"""apply_signed_cut: pure-JAX blocks and the CPU FFI kernel (both cores) vs x @ reconstruct(f).

Tolerances: all paths accumulate in f32 in different orders; against the
float64 oracle ``x @ S diag(c) Tᵀ`` they agree to 2e-6 · (|x|·|S diag(c) Tᵀ|)
elementwise-bounded sums, checked here as |Δ| ≤ 1e-5 · max|y| + 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_signedcut as sc
from conftest import cuts, part
from jax_signedcut._kernels import apply as _apply
from jax_signedcut._signedcut import packing as _packing

HAS_FFI = _apply._has_ffi_kernel()  # noqa: SLF001
needs_ffi = pytest.mark.skipif(not HAS_FFI, reason="signedcut_apply kernel not built")


def _random_factors(m, n, w, seed=0, dirty_tail=False):
  rng = np.random.default_rng(seed)  # numpy: no compile per shape
  s = rng.integers(0, 2 ** 32, (w, _packing.num_words(m)), dtype=np.uint32)
  t = rng.integers(0, 2 ** 32, (w, _packing.num_words(n)), dtype=np.uint32)
  if not dirty_tail:
    s[:, -1] &= np.uint32(_packing.tail_mask(m))
    t[:, -1] &= np.uint32(_packing.tail_mask(n))
  c = rng.uniform(0.1, 1.0, (w,)).astype(np.float32)
  return sc.SignedCut(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), jnp.int32(w), shape=(m, n))


def _oracle(x, f):
  """float64 x @ S diag(c) Tᵀ from unpacked signs (tail bits ignored)."""
  m, n = f.shape
  s = _packing.unpack_signs_np(np.asarray(cuts(f).s_bits), m).astype(np.float64)
  t = _packing.unpack_signs_np(np.asarray(cuts(f).t_bits), n).astype(np.float64)
  w = s.T @ (np.asarray(cuts(f).c, np.float64)[:, None] * t)
  return np.asarray(x, np.float64) @ w


def _close(y, ref, rtol=1e-5):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=0, atol=rtol * np.abs(ref).max() + 1e-6)


# The last shape is large enough (rows·w·(m+n) >= 2^22 at 5 rows) for the kernel to use threads.
# (545, 33, 70): 18 sign words per cut (a partial 16-word block) and a partial group of 64
# cuts in the table-lookup projection that the AVX-512 core uses for up to 4 rows.
SHAPES = [(33, 97, 300), (1, 1, 3), (1000, 7, 50), (64, 256, 513), (300, 520, 40),
          (545, 33, 70), (1024, 1000, 1500)]
IMPLS = ["jnp", pytest.param("ffi", marks=needs_ffi), pytest.param("scalar", marks=needs_ffi)]


def _run(impl, x2, f):
  if impl == "jnp":
    return _apply.apply_jnp(x2, f)
  return _apply.apply_ffi(x2, f, force_scalar=impl == "scalar")


@pytest.mark.parametrize("m, n, w", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_every_core_matches_the_oracle(m, n, w, impl, rows):
  f = _random_factors(m, n, w, seed=m + n)
  x = jax.random.normal(jax.random.key(rows), (rows, m))
  _close(_run(impl, x, f), _oracle(x, f))


@needs_ffi
@pytest.mark.parametrize("m, n, w", SHAPES[:3])
def test_kernel_ignores_stray_tail_bits(m, n, w):
  f = _random_factors(m, n, w, dirty_tail=True)
  x = jax.random.normal(jax.random.key(0), (3, m))
  ref = _oracle(x, f)
  for scalar in (False, True):
    _close(_apply.apply_ffi(x, f, force_scalar=scalar), ref)


@needs_ffi
@settings(derandomize=True, deadline=None, max_examples=10)
@given(m=st.integers(1, 300), n=st.integers(1, 300), w=st.integers(1, 80),
       rows=st.integers(1, 9))
def test_avx512_equals_scalar_hypothesis(m, n, w, rows):
  f = _random_factors(m, n, w, seed=m * 7 + n)
  x = jnp.asarray(np.random.default_rng(w).standard_normal((rows, m), np.float32))
  a = _apply.apply_ffi(x, f)
  b = _apply.apply_ffi(x, f, force_scalar=True)
  _close(a, b)
  _close(a, _oracle(x, f))


@pytest.mark.parametrize("impl", ["auto", "jnp"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [(), (1,), (7,), (4, 5)])
def test_public_apply_batch_shapes_dtypes(impl, dtype, batch):
  m, n, w = 33, 97, 300
  f = _random_factors(m, n, w)
  bias = jnp.linspace(-1, 1, n)
  x = jax.random.normal(jax.random.key(1), (*batch, m)).astype(dtype)
  ref = _oracle(np.asarray(x, np.float32).reshape(-1, m), f).reshape(*batch, n) + np.asarray(bias)
  y = jax.jit(lambda x: _apply.apply_signed_cut(x, f, bias, impl=impl))(x)
  assert y.dtype == dtype and y.shape == (*batch, n)
  _close(y, ref, rtol=1e-5 if dtype == jnp.float32 else 1e-2)


def test_vmap_and_dense_option():
  f = _random_factors(40, 70, 90)
  xs = jax.random.normal(jax.random.key(2), (3, 6, 40))
  ref = _oracle(xs.reshape(-1, 40), f).reshape(3, 6, 70)
  _close(jax.vmap(lambda x: _apply.apply_signed_cut(x, f))(xs), ref)
  _close(_apply.apply_signed_cut(xs, f, dense=True), ref)
  # Stacked factors mapped together with their activations (nn.scan / jax.vmap layers).
  fs = jax.tree.map(lambda a, b: jnp.stack([a, b]), f, _random_factors(40, 70, 90, seed=9))
  got = jax.vmap(_apply.apply_signed_cut)(xs[:2], fs)
  _close(got[1], _oracle(xs[1], _random_factors(40, 70, 90, seed=9)))


def test_bad_input():
  f = _random_factors(33, 97, 10)
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 33\).*got x shape \(2, 32\)"):
    _apply.apply_signed_cut(jnp.ones((2, 32)), f)
  with pytest.raises(TypeError, match="float"):
    _apply.apply_signed_cut(jnp.ones((2, 33), jnp.int32), f)
  with pytest.raises(ValueError, match=r"bias must have shape \(97,\)"):
    _apply.apply_signed_cut(jnp.ones((2, 33)), f, jnp.ones(96))
  fs = jax.tree.map(lambda a: jnp.stack([a, a]), f)
  with pytest.raises(ValueError, match=r"batch shape \(2,\)"):
    _apply.apply_signed_cut(jnp.ones((2, 33)), fs)
  with pytest.raises(ValueError, match="impl must be"):
    _apply.apply_signed_cut(jnp.ones((2, 33)), f, impl="cuda")


@pytest.mark.parametrize("impl", ["auto", "jnp"])
def test_grad_in_x_and_c_matches_dense(impl):
  f = _random_factors(40, 70, 90)
  x = jax.random.normal(jax.random.key(3), (5, 40))
  g = jax.random.normal(jax.random.key(4), (5, 70))

  def loss(x, c):
    ff = sc.SignedCut(cuts(f).s_bits, cuts(f).t_bits, c, cuts(f).num_cuts, shape=f.shape)
    return jnp.sum(_apply.apply_signed_cut(x, ff, impl=impl) * g)

  def dense_loss(x, c):
    ff = sc.SignedCut(cuts(f).s_bits, cuts(f).t_bits, c, cuts(f).num_cuts, shape=f.shape)
    return jnp.sum(x @ sc.reconstruct(ff) * g)

  gx, gc = jax.grad(loss, argnums=(0, 1))(x, cuts(f).c)
  rx, rc = jax.grad(dense_loss, argnums=(0, 1))(x, cuts(f).c)
  _close(gx, rx)
  _close(gc, rc)


def test_platform_dispatch_lowering():
  """Off CPU the pure-JAX path is lowered; on CPU the kernel (when built)."""
  f = _random_factors(40, 70, 90)
  fn = jax.jit(lambda x: _apply.apply_signed_cut(x, f))
  x = jax.ShapeDtypeStruct((3, 40), jnp.float32)
  cuda = jax.export.export(fn, platforms=["cuda"])(x).mlir_module()
  assert "signedcut_apply" not in cuda
  ours = [jax.export.DisabledSafetyCheck.custom_call("signedcut_apply")]
  cpu = jax.export.export(fn, platforms=["cpu"], disabled_checks=ours)(x).mlir_module()
  assert ("signedcut_apply" in cpu) == HAS_FFI


@pytest.mark.parametrize("impl", ["auto", "jnp"])
def test_vmap_over_factors_only(impl):
  fa, fb = _random_factors(40, 70, 90, seed=1), _random_factors(40, 70, 90, seed=2)
  fs = jax.tree.map(lambda a, b: jnp.stack([a, b]), fa, fb)
  x = jax.random.normal(jax.random.key(5), (6, 40))
  got = jax.vmap(lambda f: _apply.apply_signed_cut(x, f, impl=impl))(fs)
  _close(got[0], _oracle(x, fa))
  _close(got[1], _oracle(x, fb))


def _apply_in_subprocess(tmp_path, f, x, *, env=None, prefix=()):
  """apply_ffi(x, f) in a fresh Python process (env vars read once, a CPU set), as numpy."""
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  np.savez(tmp_path / "in.npz", x=x, s=cuts(f).s_bits, t=cuts(f).t_bits, c=cuts(f).c)
  (m, n), w = f.shape, cuts(f).width
  code = (
      "import numpy as np, jax.numpy as jnp, jax_signedcut as sc\n"
      "from jax_signedcut._kernels import apply as _apply\n"
      f"d = np.load({str(tmp_path / 'in.npz')!r})\n"
      "f = sc.SignedCut(jnp.asarray(d['s']), jnp.asarray(d['t']), jnp.asarray(d['c']),"
      f" jnp.int32({w}), shape=({m}, {n}))\n"
      f"np.save({str(tmp_path / 'out.npy')!r}, np.asarray(_apply.apply_ffi(jnp.asarray(d['x']), f)))\n")
  subprocess.run([*prefix, sys.executable, "-c", code],
                 env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), check=True)
  return np.load(tmp_path / "out.npy")


@needs_ffi
def test_env_var_forces_the_scalar_core(tmp_path):
  """JAX_SIGNEDCUT_APPLY_IMPL=scalar (read once by the extension) == force_scalar=True."""
  f = _random_factors(300, 257, 70)
  x = np.random.default_rng(0).standard_normal((3, 300), np.float32)
  got = _apply_in_subprocess(tmp_path, f, x, env={"JAX_SIGNEDCUT_APPLY_IMPL": "scalar"})
  np.testing.assert_array_equal(got, np.asarray(_apply.apply_ffi(jnp.asarray(x), f,
                                                                 force_scalar=True)))


@needs_ffi
def test_result_does_not_depend_on_the_thread_count(tmp_path):
  """The cuts are split into partitions fixed by the shape: one CPU or two, same bits."""
  import os  # noqa: PLC0415
  import shutil  # noqa: PLC0415
  if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs taskset and at least two usable CPUs to compare one with several")
  f = _random_factors(1024, 1000, 1500, seed=5)  # rows·w·(m+n): several partitions
  x = np.random.default_rng(1).standard_normal((3, 1024), np.float32)
  got = _apply_in_subprocess(tmp_path, f, x,
                             prefix=("taskset", "-c", str(min(os.sched_getaffinity(0)))))
  np.testing.assert_array_equal(got, np.asarray(_apply.apply_ffi(jnp.asarray(x), f)))
