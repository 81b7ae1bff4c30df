"""Scale distillation (``sc.distill``): gradients for c, lower loss, frozen bits, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_factors
from flax import nnx

import jax_signedcut as sc
from jax_signedcut._calibration import distill as _distill
from jax_signedcut._kernels import apply as _apply
from jax_signedcut.nnx import PackedFactor, SignedCutDense, swap_linears


def _unpack(bits, n):
  """±1 matrix (w, n) of packed sign words, read bit by bit (bit 1 means −1)."""
  bits = np.asarray(bits)
  out = np.empty((bits.shape[0], n), np.float64)
  for j in range(bits.shape[0]):
    for i in range(n):
      out[j, i] = -1.0 if (int(bits[j, i // 32]) >> (i % 32)) & 1 else 1.0
  return out


def _mlp(seed=0):
  return nnx.Sequential(nnx.Linear(24, 40, rngs=nnx.Rngs(seed)), nnx.LayerNorm(40, rngs=nnx.Rngs(0)),
                        nnx.gelu, nnx.Linear(40, 32, rngs=nnx.Rngs(seed + 1)))


def _student(teacher, bits=2.0):
  student = nnx.clone(teacher)
  params = nnx.state(student, nnx.Param)
  f = sc.decompose(params, key=jax.random.key(0), bits_per_weight=bits, outliers=0.02)
  swap_linears(student, f)
  # The first kernel with input scales (as calibrated cuts give it): every float part present.
  first = student.layers[0]
  student.layers[0] = SignedCutDense.from_factors(
      sc.InputScaled(jnp.linspace(0.5, 2.0, 24), first.factors), first.bias[...])
  return student


def _batches(n=3, rows=16):
  return [jax.random.normal(jax.random.key(10 + i), (rows, 24)) for i in range(n)]


@pytest.mark.parametrize("dense", [False, True])
def test_grad_c_matches_dense_oracle(dense):
  """d/dc of <G, x·W(c)> through a SignedCutDense layer is diag(Sᵀ xᵀ G T) / scale (oracle)."""
  teacher = _mlp()
  student = _student(teacher)
  layer = student.layers[0]
  f = layer.factors
  cut = f.inner.part(sc.SignedCut)
  m, n = cut.shape
  x = jax.random.normal(jax.random.key(1), (8, m))       # 8 rows: the CPU kernel's custom VJP
  g = jax.random.normal(jax.random.key(2), (8, n))
  tr = _distill._Trainable(layer, frozenset({"cuts"}), None, dense)
  frozen_signs = tr.signs if dense else None

  def loss(u):
    packed, params = _distill._states(tr.packed, tr.params, u, frozen_signs)
    y = nnx.merge(tr.graphdef, packed, params, tr.rest)(x)
    return jnp.sum(y * g)

  (key,) = [k for k in tr.u if k.endswith("/c")]
  grad_u = jax.grad(loss)(tr.u)[key]                      # u: c = c0 (1 + u)
  s, t = _unpack(cut.s_bits, m), _unpack(cut.t_bits, n)
  xs = np.asarray(x, np.float64) / np.asarray(f.scale, np.float64)[None, :]
  oracle_c = np.einsum("jm,bm,bn,jn->j", s, xs, np.asarray(g, np.float64), t)
  want = oracle_c * np.asarray(cut.c, np.float64)
  np.testing.assert_allclose(np.asarray(grad_u), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.skipif(not _apply._has_ffi_kernel(), reason="signedcut_apply kernel not built")
def test_apply_custom_vjp_c_matches_oracle():
  """The CPU kernel's custom VJP (impl="ffi") gives the oracle's c-gradient, S·diag(c)·Tᵀ read densely."""
  w = jax.random.normal(jax.random.key(5), (40, 24))
  f = sc.decompose(w, key=jax.random.key(6), width=30, outliers=0)
  x = jax.random.normal(jax.random.key(7), (6, 40))
  g = jax.random.normal(jax.random.key(8), (6, 24))

  def loss(c):
    ff = sc.SignedCut(f.s_bits, f.t_bits, c, f.num_cuts, shape=f.shape)
    return jnp.sum(_apply.apply_signed_cut(x, ff, impl="ffi", precision="highest") * g)

  s, t = _unpack(f.s_bits, 40), _unpack(f.t_bits, 24)
  want = np.einsum("jm,bm,bn,jn->j", s, np.asarray(x, np.float64), np.asarray(g, np.float64), t)
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(f.c)), want, rtol=1e-4, atol=1e-4)


def _bits(student):
  """Every non-float leaf of the compressed kernels (sign words, indices, counts)."""
  leaves = jax.tree.leaves(nnx.state(student, PackedFactor))
  return [np.asarray(a).copy() for a in leaves if not jnp.issubdtype(a.dtype, jnp.floating)]


def test_distill_lowers_loss_keeps_bits_and_round_trips(tmp_path):
  teacher = _mlp()
  student = _student(teacher)
  batches = _batches()
  bits = _bits(student)
  before = float(np.mean([_distill.relative_squared_error(student(b), teacher(b)) for b in batches]))
  res = sc.distill(student, teacher, batches, steps=20, lr=5e-2, key=jax.random.key(0),
                   dev_batches=batches[:1], eval_every=5)
  after = float(np.mean([_distill.relative_squared_error(student(b), teacher(b)) for b in batches]))
  assert after < 0.8 * before, (before, after)
  assert res.loss.shape == (20,) and list(res.dev_steps) == [0, 5, 10, 15, 20]
  assert res.dev_loss[0] == pytest.approx(
      float(_distill.relative_squared_error(_student(teacher)(batches[0]), teacher(batches[0]))),
      rel=1e-5)
  assert res.best_step == int(res.dev_steps[np.argmin(res.dev_loss)])
  for a, b in zip(bits, _bits(student), strict=True):
    np.testing.assert_array_equal(a, b)
  packed = nnx.state(student, PackedFactor)
  scale = packed["layers"][0]["kernel"].get_value().scale
  assert bool(jnp.all(scale > 0))
  path = str(tmp_path / "distilled.safetensors")
  kernels = {f"layer{i}": packed["layers"][i]["kernel"].get_value() for i in (0, 3)}
  sc.save(path, kernels)
  loaded = sc.load(path)
  assert sorted(loaded) == ["layer0", "layer3"]
  for name, f in kernels.items():
    assert_same_factors(jax.tree.map(np.asarray, loaded[name]), jax.tree.map(np.asarray, f))


def test_same_key_same_result_and_dense_matches_factored():
  teacher = _mlp()
  batches = _batches()
  runs = []
  for dense in (True, True, False):
    student = _student(teacher)
    res = sc.distill(student, teacher, batches, steps=6, lr=1e-2, key=jax.random.key(3),
                     dense=dense)
    runs.append((res.loss, jax.tree.map(np.asarray, nnx.state(student, PackedFactor))))
  np.testing.assert_array_equal(runs[0][0], runs[1][0])
  assert_same_factors(runs[0][1], runs[1][1])
  np.testing.assert_allclose(runs[2][0], runs[0][0], rtol=1e-3)
  # Unused cut slots stay zero: the result is a valid compressed value.
  for f in jax.tree.leaves(runs[0][1], is_leaf=sc.is_compressed):
    if sc.is_compressed(f):
      f.check()


def test_only_trains_matching_leaves_and_targets():
  teacher = _mlp()
  student = _student(teacher)
  batches = _batches(2)
  frozen_before = np.asarray(student.layers[3].factors.part(sc.SignedCut).c).copy()
  targets = [teacher(b) for b in batches]
  res = sc.distill(student, teacher, batches, steps=3, lr=1e-2, only=r"^layers/0/",
                   targets=targets, train=("cuts",))
  assert res.trained == student.layers[0].factors.inner.part(sc.SignedCut).width
  np.testing.assert_array_equal(np.asarray(student.layers[3].factors.part(sc.SignedCut).c),
                                frozen_before)


def test_bad_input():
  teacher = _mlp()
  student = _student(teacher)
  batches = _batches(1)
  ok = dict(steps=2, lr=1e-2)
  with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
    sc.distill(student, teacher, batches, steps=0)
  for lr in (math.nan, math.inf, 0.0, -1.0):
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
      sc.distill(student, teacher, batches, steps=2, lr=lr)
  with pytest.raises(ValueError, match="batches is empty"):
    sc.distill(student, teacher, [], **ok)
  with pytest.raises(TypeError, match="batches must be a list"):
    sc.distill(student, teacher, batches[0], **ok)
  with pytest.raises(ValueError, match="dev_batches is empty"):
    sc.distill(student, teacher, batches, dev_batches=[], **ok)
  with pytest.raises(ValueError, match=r"unknown \['bias'\]"):
    sc.distill(student, teacher, batches, train=("cuts", "bias"), **ok)
  with pytest.raises(ValueError, match="nothing to train"):
    sc.distill(student, teacher, batches, only="no/such/leaf", **ok)
  with pytest.raises(ValueError, match="one teacher output per batch: 1 batches, 2"):
    sc.distill(student, teacher, batches, targets=[teacher(batches[0])] * 2, **ok)
  other = nnx.Sequential(nnx.Linear(24, 40, rngs=nnx.Rngs(0)), nnx.gelu,
                         nnx.Linear(40, 32, rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match=r"different modules: only in the student \['layers/1', "
                     r"'layers/3'\], only in the teacher \['layers/2'\]"):
    sc.distill(student, other, batches, **ok)
  rms = nnx.Sequential(nnx.Linear(24, 40, rngs=nnx.Rngs(0)), nnx.RMSNorm(40, rngs=nnx.Rngs(0)),
                       nnx.gelu, nnx.Linear(40, 32, rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match="differ at layers/1: LayerNorm vs RMSNorm"):
    sc.distill(student, rms, batches, **ok)
  wide = nnx.Sequential(nnx.Linear(24, 48, rngs=nnx.Rngs(0)), nnx.LayerNorm(40, rngs=nnx.Rngs(0)),
                        nnx.gelu, nnx.Linear(40, 32, rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match=r"compressed kernel \(24, 40\), teacher kernel \(24, 48\)"):
    sc.distill(student, wide, batches, **ok)
  with pytest.raises(TypeError, match="must be nnx.Module"):
    sc.distill(student, lambda x: x, batches, **ok)
  with pytest.raises(ValueError, match="differ in structure or shape"):
    sc.distill(student, teacher, batches, outputs=lambda m, b: m(b) if isinstance(m.layers[0],
               SignedCutDense) else m(b)[:, :4], **ok)
  with pytest.raises(ValueError, match="loss is not finite"):
    sc.distill(student, teacher, batches, loss=lambda s, t, b: jnp.sum(s) * jnp.nan, **ok)


def test_distill_trains_the_floats_inside_row_blocks():
  """A RowBlocks kernel (calibrated block search): dense and factored training agree, the
  perm and every sign bit stay, and the loss falls."""
  teacher = _mlp()
  batches = _batches()
  runs = []
  for dense in (True, False):
    student = _student(teacher)
    w = teacher.layers[3].kernel[...]                       # (40, 32)
    perm = jnp.asarray(np.random.default_rng(0).permutation(40), jnp.int32)
    top = sc.decompose(w[perm[:15]], key=jax.random.key(1), bits_per_weight=2, outliers=0.02)
    rest = sc.InputScaled(jnp.linspace(0.5, 2.0, 25, dtype=jnp.float32),
                          sc.decompose(w[perm[15:]] * jnp.linspace(0.5, 2.0, 25)[:, None],
                                       key=jax.random.key(2), bits_per_weight=2, outliers=0))
    f = sc.RowBlocks(perm, (top, rest))
    student.layers[3] = SignedCutDense.from_factors(f, teacher.layers[3].bias[...])
    signs = {}
    _distill._signs(f, "", signs)
    np.testing.assert_allclose(np.asarray(_distill._dense_of(f, "", signs)),
                               np.asarray(f.reconstruct()), rtol=1e-5, atol=1e-6)
    before = float(np.mean([_distill.relative_squared_error(student(b), teacher(b))
                            for b in batches]))
    res = sc.distill(student, teacher, batches, steps=10, lr=2e-2, key=jax.random.key(0),
                     dense=dense)
    after = float(np.mean([_distill.relative_squared_error(student(b), teacher(b))
                           for b in batches]))
    assert after < before
    g = student.layers[3].factors
    assert isinstance(g, sc.RowBlocks)
    np.testing.assert_array_equal(np.asarray(g.perm), np.asarray(perm))
    for a, b in zip((top.part(sc.SignedCut), rest.inner), (g.parts[0].part(sc.SignedCut),
                                                           g.parts[1].inner)):
      np.testing.assert_array_equal(np.asarray(a.s_bits), np.asarray(b.s_bits))
      np.testing.assert_array_equal(np.asarray(a.t_bits), np.asarray(b.t_bits))
    assert not np.array_equal(np.asarray(g.parts[1].inner.c), np.asarray(rest.inner.c))
    runs.append(res.loss)
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-3)


def _codes_dense(q):
  """The (r, c) integer codes of a per-row QuantizedMatrix, read bit by bit (readable oracle)."""
  words = np.asarray(q.codes)
  r, c = q.shape
  out = np.empty((r, c), np.int64)
  for i in range(r):
    for j in range(c):
      bit = j * q.bits
      v = 0
      for k in range(q.bits):
        v |= ((int(words[i, (bit + k) // 32]) >> ((bit + k) % 32)) & 1) << k
      out[i, j] = v
  return out


@pytest.mark.parametrize("dense", [True, False])
def test_distill_trains_the_scales_of_int_codes(dense):
  """GPTQ / RTN kernels (QuantizedMatrix): their per-row scales train as s0 (1 + u), the codes
  stay bit for bit and the loss falls (through dense kernels or the layers' own product)."""
  teacher = _mlp()
  batches = _batches()
  student = nnx.clone(teacher)
  params = nnx.state(student, nnx.Param)
  f = sc.decompose(params, key=jax.random.key(0), method="rtn", bits_per_weight=5)
  swap_linears(student, f)
  q0 = student.layers[3].factors
  q0 = q0.inner if isinstance(q0, sc.Transposed) else q0
  assert isinstance(q0, sc.QuantizedMatrix)
  # The moved value against its readable form: codes × the scales times (1 + u).
  u = {"s": jnp.linspace(-0.1, 0.1, q0.scale.size).reshape(q0.scale.shape)}
  moved = _distill._apply_floats(q0, "", {"scale": u["s"]})
  codes = _codes_dense(q0)
  np.testing.assert_array_equal(_codes_dense(moved), codes)
  ratio = np.asarray(moved.reconstruct()) / np.where(np.asarray(q0.reconstruct()) == 0, 1,
                                                     np.asarray(q0.reconstruct()))
  nz = np.asarray(q0.reconstruct()) != 0
  np.testing.assert_allclose(ratio[nz], np.broadcast_to(1 + np.asarray(u["s"]),
                                                        q0.shape)[nz], rtol=1e-5)
  before = float(np.mean([_distill.relative_squared_error(student(b), teacher(b))
                          for b in batches]))
  res = sc.distill(student, teacher, batches, steps=10, lr=2e-2, key=jax.random.key(0),
                   dense=dense, train=("quant_scales",))
  after = float(np.mean([_distill.relative_squared_error(student(b), teacher(b))
                         for b in batches]))
  assert after < before and res.trained == sum(
      int(np.prod(np.shape(layer.factors.inner.scale if isinstance(layer.factors, sc.Transposed)
                           else layer.factors.scale)))
      for layer in (student.layers[0], student.layers[3]))
  q1 = student.layers[3].factors
  q1 = q1.inner if isinstance(q1, sc.Transposed) else q1
  np.testing.assert_array_equal(np.asarray(q1.codes), np.asarray(q0.codes))
  assert not np.array_equal(np.asarray(q1.scale), np.asarray(q0.scale))
