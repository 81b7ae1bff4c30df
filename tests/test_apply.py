"""apply_signed_cut: pure-JAX blocks and the CPU FFI kernel (every core) vs x @ reconstruct(f).

Tolerances: the f32 paths accumulate in f32 in different orders; against the
float64 oracle ``x @ S diag(c) Tᵀ`` they agree to 2e-6 · (|x|·|S diag(c) Tᵀ|)
elementwise-bounded sums, checked here as |Δ| ≤ 1e-5 · max|y| + 1e-6. The bf16
cores (AMX, AVX512-BF16) round x to bf16 and then compute in f32 with p in two
bf16 halves (2⁻¹⁶ relative): they are checked against the float64 oracle of
the rounded x at 3e-5 · max|y|, and against the scalar f32 core run on the
rounded x; a bf16 core that did not round x, or any other slip, fails that.
The opt-in single-pass mode (precision="bf16_bf16_f32") rounds p once too:
|Δ| ≤ 2⁻⁸ · Σ_j |p_j| + 3e-5 · max|y| + 1e-6 against the float64 oracle of the
rounded x (round to nearest: |bf16(v) − v| ≤ 2⁻⁸ |v|), and bit for bit
against a numpy emulation on integer data where every f32 sum is exact.
Cores this CPU lacks are skipped with the reason (pytest -rs shows which ran).
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


def _close_bf16(y, x, f, p_rel=2e-5):
  """A bf16 core's y against the float64 oracle of bf16(x).

  p = c ∘ (x·S) enters the second product as two bf16 halves (|p − hi − lo|
  ≤ 2⁻¹⁶ |p|), so besides f32 accumulation the error is bounded by
  ``p_rel``·Σ_j |p_j| with p_rel = 2e-5 ≥ 2⁻¹⁶ (which matters where the cuts
  cancel); a core that rounded p to one bf16 would be off by up to
  2⁻⁸·Σ_j |p_j|, the bound of the single-pass mode (p_rel = 2⁻⁸).
  """
  m, _ = f.shape
  xb = _bf16(x).astype(np.float64)
  s = _packing.unpack_signs_np(np.asarray(f.s_bits), m).astype(np.float64)
  p_abs = np.abs((xb @ s.T) * np.asarray(f.c, np.float64)[None, :]).sum(axis=1)  # (rows,)
  ref = _oracle(xb, f)
  y = np.asarray(y, np.float64)
  assert y.shape == ref.shape
  bound = 3e-5 * np.abs(ref).max() + p_rel * p_abs[:, None] + 1e-6
  bad = np.abs(y - ref) > bound
  assert not bad.any(), f"{bad.sum()} of {bad.size} off: max |Δ| {np.abs(y - ref).max():.3g}"


def _close(y, ref, rtol=1e-5):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=0, atol=rtol * np.abs(ref).max() + 1e-6)


# The last shape is large enough (rows·w·(m+n) >= 2^22 at 5 rows) for the kernel to use threads.
# (545, 33, 70): 18 sign words per cut (a partial 16-word block) and a partial group of 64
# cuts in the table-lookup projection that the AVX-512 core uses for up to 4 rows.
SHAPES = [(33, 97, 300), (1, 1, 3), (1000, 7, 50), (64, 256, 513), (300, 520, 40),
          (545, 33, 70), (1024, 1000, 1500)]
BF16_CORES = ("avx512_bf16", "amx")


def _core_skip(core):
  """The reason this machine cannot run `core`, or None."""
  if not HAS_FFI:
    return "signedcut_apply kernel not built"
  try:
    _apply.apply_core(core)
  except ValueError as e:
    return f"{core}: {e}"
  return None


def _core_param(core):
  why = _core_skip(core)
  return pytest.param(core, marks=pytest.mark.skipif(why is not None, reason=str(why)))


CORES = [_core_param(c) for c in ("scalar", "avx512", *BF16_CORES)]
IMPLS = ["jnp", pytest.param("ffi", marks=needs_ffi), *CORES]


def _run(impl, x2, f):
  if impl == "jnp":
    return _apply.apply_jnp(x2, f)
  if impl == "ffi":
    return _apply.apply_ffi(x2, f, precision="highest")
  return _apply.apply_ffi(x2, f, core=impl)


def _bf16(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("m, n, w", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [1, 3, 5, 17])
def test_every_core_matches_the_oracle(m, n, w, impl, rows):
  f = _random_factors(m, n, w, seed=m + n)
  x = jax.random.normal(jax.random.key(rows), (rows, m))
  if impl in BF16_CORES:
    _close_bf16(_run(impl, x, f), x, f)
  else:
    _close(_run(impl, x, f), _oracle(x, f))


@needs_ffi
@settings(derandomize=True, deadline=None, max_examples=12)
@given(m=st.integers(1, 300), n=st.integers(1, 300), w=st.integers(1, 700),
       rows=st.integers(1, 40), core=st.sampled_from(BF16_CORES))
def test_bf16_cores_equal_scalar_on_rounded_x(m, n, w, rows, core):
  why = _core_skip(core)
  if why is not None:
    pytest.skip(why)
  f = _random_factors(m, n, w, seed=m * 5 + n)
  x = np.random.default_rng(w).standard_normal((rows, m), np.float32)
  got = _apply.apply_ffi(jnp.asarray(x), f, core=core)
  _close_bf16(got, x, f)
  _close(got, _apply.apply_ffi(jnp.asarray(_bf16(x)), f, core="scalar"), rtol=1e-4)
  # x really was rounded: the unrounded product is further away than the
  # tolerance above (by ~2⁻⁹ relative) wherever x has more than 8 significant bits.
  assert np.abs(np.asarray(got) - _oracle(x, f)).max() > 3e-5 * np.abs(_oracle(x, f)).max()


@pytest.mark.parametrize("core", [_core_param(c) for c in BF16_CORES])
def test_bf16_overlapped_sign_expansion(core):
  """The paths of the bf16 driver that the shapes above reach only by chance.

  33 rows: three batch tiles (the last one alone), so the next column tiles'
  signs are expanded during the current products; n = 100: four pairs of
  column tiles; w = 2100 over four partitions: two chunks each, the last with
  13 cuts (an odd number of 16-cut blocks, half a 32-cut block of zeros).
  """
  f = _random_factors(70, 100, 2100, seed=7)
  x = np.random.default_rng(3).standard_normal((33, 70), np.float32)
  got = _apply.apply_ffi(jnp.asarray(x), f, core=core)
  _close_bf16(got, x, f)
  _close(got, _apply.apply_ffi(jnp.asarray(_bf16(x)), f, core="scalar"), rtol=1e-4)


@pytest.mark.parametrize("core", [_core_param(c) for c in BF16_CORES])
@pytest.mark.parametrize("precision", [None, "bf16_bf16_f32"])
def test_bf16_split_by_rows(core, precision):
  """From 8 batch tiles (128 rows) the bf16 driver gives each partition a range of batch tiles
  and all the cuts, written straight into y. 150 rows: ten tiles, the last one with 6 rows;
  w = 1100: three chunks of cuts, the last partial; n = 100 not a multiple of 16. Every row
  equals the same row computed alone in a small batch (which the driver splits by cuts), to
  the bf16 tolerance, and the split-by-rows result does not depend on which rows share a call."""
  f = _random_factors(70, 100, 1100, seed=5)
  x = np.random.default_rng(8).standard_normal((150, 70), np.float32)
  got = np.asarray(_apply.apply_ffi(jnp.asarray(x), f, core=core, precision=precision))
  _close_bf16(got, x, f, p_rel=2.0 ** -8 if precision else 2e-5)
  small = np.concatenate([np.asarray(_apply.apply_ffi(jnp.asarray(x[i:i + 30]), f, core=core,
                                                      precision=precision))
                          for i in range(0, 150, 30)])
  _close(got, small, rtol=1e-5)   # the same p, summed in another order
  # Rows 0..127 alone (8 tiles: split by rows too) are bit-identical to the same rows above.
  np.testing.assert_array_equal(
      np.asarray(_apply.apply_ffi(jnp.asarray(x[:128]), f, core=core, precision=precision)),
      got[:128])


@pytest.mark.parametrize("core", [_core_param(c) for c in BF16_CORES])
def test_matmul_precision_reaches_the_cuts_inside_parts(core):
  """``sc.matmul``/``Compressed.matmul`` pass ``precision`` down to the signed cuts inside a
  sum of parts (and a scaled part): "highest" gives the f32 cores' product bit for bit, the
  default the bf16 core's."""
  m, n, w, rows = 256, 256, 512, 16      # rows·w·(m + n) ≥ BF16_MIN_WORK: auto takes bf16
  cut = _random_factors(m, n, w, seed=4)
  scale = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, m).astype(np.float32))
  f = sc.Sum((cut, sc.InputScaled(scale, cut)))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((rows, m), np.float32))
  hi = _apply.apply_ffi(x, cut, precision="highest") \
      + _apply.apply_ffi(x / scale[None, :], cut, precision="highest")
  np.testing.assert_array_equal(np.asarray(f.matmul(x, precision="highest")), np.asarray(hi))
  lo = _apply.apply_ffi(x, cut, core=core) + _apply.apply_ffi(x / scale[None, :], cut, core=core)
  if _apply.apply_core("auto", rows=rows, work=rows * w * (m + n)) == core:
    np.testing.assert_array_equal(np.asarray(sc.matmul(x, f)), np.asarray(lo))
  assert not np.array_equal(np.asarray(lo), np.asarray(hi))   # the levels really differ here


SINGLE = "bf16_bf16_f32"


@pytest.mark.parametrize("m, n, w", SHAPES)
@pytest.mark.parametrize("core", [_core_param(c) for c in BF16_CORES])
def test_single_pass_matches_the_oracle(m, n, w, core):
  """precision="bf16_bf16_f32": within 2⁻⁸·Σ_j|p_j| of the oracle of bf16(x), not the default."""
  f = _random_factors(m, n, w, seed=m + n)
  x = jax.random.normal(jax.random.key(17), (17, m))
  got = _apply.apply_ffi(x, f, core=core, precision=SINGLE)
  _close_bf16(got, x, f, p_rel=2.0 ** -8)
  # p really entered as one bf16: the default (two halves) differs.
  assert (np.asarray(got) != np.asarray(_apply.apply_ffi(x, f, core=core))).any()


@pytest.mark.parametrize("core", [_core_param(c) for c in BF16_CORES])
def test_single_pass_rounds_p_once_to_nearest_even(core):
  """Bit for bit on integer data: x ∈ -3..3 and c ∈ 1..63 make every p an
  integer below 2¹⁶ and every f32 sum exact, so the default (p_hi + p_lo, 16
  bits) gives x·W exactly and the single pass Σ_j bf16(p_j)·t_j exactly."""
  m, n, w = SHAPES[4]
  rng = np.random.default_rng(11)
  f = _random_factors(m, n, w, seed=m + n)
  f = sc.SignedCut(f.s_bits, f.t_bits, jnp.asarray(rng.integers(1, 64, w).astype(np.float32)),
                   f.num_cuts, shape=f.shape)
  x = rng.integers(-3, 4, (17, m)).astype(np.float32)
  s = _packing.unpack_signs_np(np.asarray(f.s_bits), m).astype(np.float64)
  t = _packing.unpack_signs_np(np.asarray(f.t_bits), n).astype(np.float64)
  p = (x @ s.T) * np.asarray(f.c, np.float64)[None, :]                  # exact integers
  assert np.abs(p).max() < 2 ** 16 and (np.abs(p) > 256).mean() > 0.5  # most p get rounded
  np.testing.assert_array_equal(_apply.apply_ffi(jnp.asarray(x), f, core=core), p @ t)
  np.testing.assert_array_equal(_apply.apply_ffi(jnp.asarray(x), f, core=core, precision=SINGLE),
                                _bf16(p.astype(np.float32)).astype(np.float64) @ t)


@needs_ffi
def test_precision_values():
  """Every accepted spelling, and a clear error for the rest (Python and the FFI attribute)."""
  P, D = jax.lax.Precision, jax.lax.DotAlgorithmPreset
  for v, level in [(None, "default"), ("default", "default"), (P.DEFAULT, "default"),
                   ("bf16_bf16_f32", SINGLE), (D.BF16_BF16_F32, SINGLE), ("HIGHEST", "highest"),
                   ("high", "highest"), (P.HIGH, "highest"), (P.HIGHEST, "highest")]:
    assert _apply.check_precision(v) == level
  for bad in ("bf16", "fastest", 2, D.BF16_BF16_F32_X3, [None]):
    with pytest.raises(ValueError, match="precision must be None, 'default', 'bf16_bf16_f32'"):
      _apply.check_precision(bad)
  f = _random_factors(33, 97, 300)
  call = jax.ffi.ffi_call("signedcut_apply", jax.ShapeDtypeStruct((2, 97), jnp.float32))
  with pytest.raises(Exception, match="precision must be 0 .* got 3"):
    jax.block_until_ready(call(jnp.ones((2, 33)), f.s_bits, f.t_bits, f.c, impl=np.int32(0),
                               precision=np.int32(3)))


@needs_ffi
def test_auto_core_choice():
  """auto: f32 below the best bf16 core's BF16_MIN_ROWS rows or with exact, else that core."""
  f32 = _apply.apply_core("auto", rows=1)
  assert f32 in ("scalar", "avx512")
  assert _apply.apply_core("auto", exact=True, rows=512) == f32
  assert _apply.BF16_MIN_ROWS == {"amx": 8, "avx512_bf16": 16}
  best = next((c for c in ("amx", "avx512_bf16") if _core_skip(c) is None), f32)
  big = _apply.BF16_MIN_WORK
  rows = _apply.BF16_MIN_ROWS.get(best, 8)
  assert _apply.apply_core("auto", rows=rows, work=big) == best
  assert _apply.apply_core("auto", rows=rows - 1, work=big) == f32
  assert _apply.apply_core("auto", rows=rows, work=big - 1) == f32
  assert _apply.apply_core("auto", rows=512, work=big) == best
  assert (_apply._bf16_core() or f32) == best  # noqa: SLF001
  with pytest.raises(ValueError, match="impl must be"):
    _apply.apply_core("tpu")


@needs_ffi
@pytest.mark.parametrize("m, n, w", SHAPES[:3])
def test_kernel_ignores_stray_tail_bits(m, n, w):
  f = _random_factors(m, n, w, dirty_tail=True)
  x = jax.random.normal(jax.random.key(0), (9, m))
  ref = _oracle(x, f)
  for core in ("scalar", "avx512", *BF16_CORES):
    if _core_skip(core) is None:
      got = _apply.apply_ffi(x, f, core=core)
      _close_bf16(got, x, f) if core in BF16_CORES else _close(got, ref)
  _close(_apply.apply_ffi(x, f, force_scalar=True), ref)


@needs_ffi
@settings(derandomize=True, deadline=None, max_examples=10)
@given(m=st.integers(1, 300), n=st.integers(1, 300), w=st.integers(1, 80),
       rows=st.integers(1, 9))
def test_avx512_equals_scalar_hypothesis(m, n, w, rows):
  if _core_skip("avx512") is not None:
    pytest.skip(_core_skip("avx512"))
  f = _random_factors(m, n, w, seed=m * 7 + n)
  x = jnp.asarray(np.random.default_rng(w).standard_normal((rows, m), np.float32))
  a = _apply.apply_ffi(x, f, core="avx512")
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
  # From BF16_MIN_ROWS rows the kernel may round x to bf16 (precision=None).
  rows = int(np.prod(batch))
  bf16_math = impl == "auto" and HAS_FFI and _apply.apply_core(
      "auto", rows=rows, work=rows * w * (m + n)) in BF16_CORES
  _close(y, ref, rtol=1e-5 if dtype == jnp.float32 and not bf16_math else 1e-2)
  if dtype == jnp.float32:
    y = _apply.apply_signed_cut(x, f, bias, impl=impl, precision="highest")
    _close(y, ref, rtol=1e-5)


def test_vmap_and_dense_option():
  f = _random_factors(40, 70, 90)
  xs = jax.random.normal(jax.random.key(2), (3, 6, 40))
  ref = _oracle(xs.reshape(-1, 40), f).reshape(3, 6, 70)
  _close(jax.vmap(lambda x: _apply.apply_signed_cut(x, f, precision="highest"))(xs), ref)
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
  with pytest.raises(ValueError, match="precision must be"):
    _apply.apply_signed_cut(jnp.ones((2, 33)), f, precision="bf16")
  with pytest.raises(ValueError, match="core must be"):
    _apply.apply_ffi(jnp.ones((2, 33)), f, core="avx2")


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


@pytest.mark.parametrize("core", CORES)
def test_env_var_picks_the_core(tmp_path, core):
  """JAX_SIGNEDCUT_APPLY_IMPL=<core> (read once by the extension) == core=<core>."""
  f = _random_factors(300, 257, 70)
  x = np.random.default_rng(0).standard_normal((9, 300), np.float32)
  got = _apply_in_subprocess(tmp_path, f, x, env={"JAX_SIGNEDCUT_APPLY_IMPL": core})
  np.testing.assert_array_equal(got, np.asarray(_apply.apply_ffi(jnp.asarray(x), f, core=core)))


@needs_ffi
def test_env_var_bad_value_is_an_error(tmp_path):
  f = _random_factors(30, 20, 7)
  x = np.ones((2, 30), np.float32)
  import subprocess  # noqa: PLC0415
  with pytest.raises(subprocess.CalledProcessError):
    _apply_in_subprocess(tmp_path, f, x, env={"JAX_SIGNEDCUT_APPLY_IMPL": "avx2"})


@pytest.mark.parametrize("core", CORES)
def test_result_does_not_depend_on_the_thread_count(tmp_path, core):
  """The cuts are split into partitions fixed by the shape: one CPU or two, same bits."""
  import os  # noqa: PLC0415
  import shutil  # noqa: PLC0415
  if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs taskset and at least two usable CPUs to compare one with several")
  f = _random_factors(1024, 1000, 1500, seed=5)  # rows·w·(m+n): several partitions
  x = np.random.default_rng(1).standard_normal((3, 1024), np.float32)
  got = _apply_in_subprocess(tmp_path, f, x, env={"JAX_SIGNEDCUT_APPLY_IMPL": core},
                             prefix=("taskset", "-c", str(min(os.sched_getaffinity(0)))))
  np.testing.assert_array_equal(got, np.asarray(_apply.apply_ffi(jnp.asarray(x), f, core=core)))


@needs_ffi
def test_public_apply_rounds_x_only_where_a_bf16_core_pays():
  """precision=None: a bf16 core from BF16_MIN_ROWS rows and BF16_MIN_WORK; "highest": f32."""
  best = next((c for c in ("amx", "avx512_bf16") if _core_skip(c) is None), None)
  if best is None:
    pytest.skip("no bf16 core on this CPU: " + "; ".join(_core_skip(c) for c in BF16_CORES))
  m, n, w = 512, 512, 300  # 16 rows: 16·w·(m + n) ≈ 4.9M ≥ BF16_MIN_WORK
  f = _random_factors(m, n, w, seed=3)
  x = jax.random.normal(jax.random.key(6), (16, m))
  fast = jax.jit(lambda x: _apply.apply_signed_cut(x, f))(x)
  _close_bf16(fast, x, f)
  np.testing.assert_array_equal(np.asarray(fast), np.asarray(_apply.apply_ffi(x, f, core=best)))
  exact = _apply.apply_signed_cut(x, f, precision=jax.lax.Precision.HIGHEST)
  _close(exact, _oracle(x, f))
  assert np.abs(np.asarray(fast) - np.asarray(exact)).max() > 1e-4 * np.abs(exact).max()
  # The single pass only when asked: by apply_signed_cut and by both layers' precision field.
  single = np.asarray(_apply.apply_ffi(x, f, core=best, precision=SINGLE))
  assert (single != np.asarray(fast)).any()
  np.testing.assert_array_equal(np.asarray(_apply.apply_signed_cut(
      x, f, precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32)), single)
  from flax import nnx  # noqa: PLC0415
  import jax_signedcut.linen as scl  # noqa: PLC0415
  from jax_signedcut.nnx import SignedCutDense  # noqa: PLC0415
  for precision, want in [(None, fast), (SINGLE, single), ("highest", exact)]:
    layer = SignedCutDense.from_factors(f, precision=precision)
    np.testing.assert_array_equal(np.asarray(layer(x)), want)
    graphdef, state = nnx.split(layer)          # the level is static: the state (what
    assert nnx.merge(graphdef, state).precision == precision  # checkpoints hold) is the
    assert jax.tree.structure(state) == jax.tree.structure(  # same for every level
        nnx.state(SignedCutDense.from_factors(f)))
    linen = scl.SignedCutDense(n, use_bias=False, precision=precision)
    np.testing.assert_array_equal(
        np.asarray(linen.apply({scl.COLLECTION: {scl.KERNEL: f}}, x)), want)
  with pytest.raises(ValueError, match="precision must be"):
    SignedCutDense.from_factors(f, precision="fast")
  with pytest.raises(ValueError, match="precision must be"):
    scl.SignedCutDense(n, width=4, precision="fast")
  # Below the work threshold the same rows stay in f32.
  small = _random_factors(40, 30, 20)
  _close(_apply.apply_signed_cut(x[:, :40], small), _oracle(x[:, :40], small))
