"""One-layer attention regression: loss forms, gradient, and the fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as jsc


def _problem(n=4, nk=5, d1=2, d2=3, d3=2, e=3, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 6)
  shapes = [(n, d1), (nk, d2), (nk, d3), (n, e), (d1, d2), (d3, e)]
  return [jax.random.normal(k, s, dtype) for k, s in zip(ks, shapes)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kronecker_form_equals_matrix_form(seed):
  a1, a2, a3, b, x, y = _problem(seed=seed)
  np.testing.assert_allclose(jsc.attention_loss_kron(a1, a2, a3, b, x, y),
                             jsc.attention_loss(a1, a2, a3, b, x, y), rtol=1e-5)
  # The paper's square case too: A1, A2, A3, B all n×d, X, Y d×d.
  a1, a2, a3, b, x, y = _problem(n=6, nk=6, d1=3, d2=3, d3=3, e=3, seed=seed)
  np.testing.assert_allclose(jsc.attention_loss_kron(a1, a2, a3, b, x, y),
                             jsc.attention_loss(a1, a2, a3, b, x, y), rtol=1e-5)


def test_autodiff_gradient_equals_closed_form():
  with jax.enable_x64(True):
    a1, a2, a3, b, x, y = _problem(n=7, nk=5, d1=3, d2=4, d3=2, e=3, dtype=jnp.float64)
    gx, gy = jax.grad(jsc.attention_loss, argnums=(4, 5))(a1, a2, a3, b, x, y)
    cx, cy = jsc.attention_grad(a1, a2, a3, b, x, y)
    np.testing.assert_allclose(gx, cx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gy, cy, rtol=1e-10, atol=1e-12)


def test_stable_for_large_scores():
  a1, a2, a3, b, x, y = _problem()
  big = jsc.attention_loss(a1, a2, a3, b, 1e4 * x, y)
  assert np.isfinite(float(big))
  grad = jax.grad(jsc.attention_loss, argnums=4)(a1, a2, a3, b, 1e4 * x, y)
  assert np.isfinite(np.asarray(grad)).all()


def _planted(dtype):
  n, d = 12, 3
  ks = jax.random.split(jax.random.key(0), 6)
  a1, a2, a3 = (0.7 * jax.random.normal(k, (n, d), dtype) for k in ks[:3])
  x_star = jax.random.normal(ks[3], (d, d), dtype)
  y_star = jax.random.normal(ks[4], (d, d), dtype)
  b = jsc.attention_probs(a1, a2, x_star) @ a3 @ y_star
  return a1, a2, a3, b, x_star, y_star, jax.random.normal(ks[5], (d, d), dtype)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_planted_instance_converges_from_nearby(solver):
  with jax.enable_x64(True):
    a1, a2, a3, b, x_star, y_star, noise = _planted(jnp.float64)
    fit = jsc.fit_attention(a1, a2, a3, b, x0=x_star + 0.05 * noise, y0=jnp.zeros_like(y_star),
                            iters=4, solver=solver)
    assert fit.loss[0] > 1.0
    assert float(fit.loss[-1]) < 1e-8, np.asarray(fit.loss)
    np.testing.assert_allclose(fit.x, x_star, atol=1e-4)
    np.testing.assert_allclose(fit.y, y_star, atol=1e-4)


@pytest.mark.parametrize("reg,projected", [(0.0, True), (1e-2, True), (0.0, False)])
def test_from_zero_loss_decreases_monotonically(reg, projected):
  a1, a2, a3, b, _, y_star, _ = _planted(jnp.float32)
  x0 = jnp.zeros((3, 3))
  fit = jsc.fit_attention(a1, a2, a3, b, x0=x0, y0=jnp.zeros_like(y_star), iters=15, reg=reg,
                          projected=projected)
  loss = np.asarray(fit.loss)
  assert np.all(loss[1:] <= loss[:-1] * (1 + 1e-5)), loss
  assert loss[-1] < 0.5 * loss[1]
  # The history is the objective of the returned pair.
  expect = jsc.attention_loss(a1, a2, a3, b, fit.x, fit.y) + reg * jnp.sum(fit.y**2)
  np.testing.assert_allclose(loss[-1], expect, rtol=1e-5)


def test_jit_and_vmap():
  a1, a2, a3, b, x, y = _problem()
  xs = jnp.stack([x, 2 * x, -x])
  vm = jax.vmap(lambda xx: jsc.attention_loss(a1, a2, a3, b, xx, y))(xs)
  for i in range(3):
    np.testing.assert_allclose(vm[i], jsc.attention_loss(a1, a2, a3, b, xs[i], y), rtol=1e-6)
  fit = lambda bb: jsc.fit_attention(a1, a2, a3, bb, x0=x, y0=y, iters=3).loss  # noqa: E731
  np.testing.assert_allclose(jax.jit(fit)(b), fit(b), rtol=1e-5)


@pytest.mark.parametrize("change,exc,match", [
    (dict(a3=jnp.ones((4, 2))), ValueError, r"a3 must have as many rows as a2 \(5\)"),
    (dict(b=jnp.ones((3, 3))), ValueError, r"b must have as many rows as a1 \(4\)"),
    (dict(x=jnp.ones((3, 2))), ValueError, r"x must have shape .* = \(2, 3\), got \(3, 2\)"),
    (dict(y=jnp.ones((2, 4))), ValueError, r"y must have shape .* = \(2, 3\), got \(2, 4\)"),
    (dict(a1=jnp.ones((4, 2), jnp.int32)), TypeError, "a1 must be a float array"),
    (dict(a2=jnp.ones(5)), ValueError, "a2 must be a matrix"),
])
def test_bad_shapes(change, exc, match):
  args = dict(zip(("a1", "a2", "a3", "b", "x", "y"), _problem()))
  args.update(change)
  with pytest.raises(exc, match=match):
    jsc.attention_loss(**args)
  with pytest.raises(exc, match=match.replace("x must", "x0 must").replace("y must", "y0 must")):
    a1, a2, a3, b, x, y = (args[k] for k in ("a1", "a2", "a3", "b", "x", "y"))
    jsc.fit_attention(a1, a2, a3, b, x0=x, y0=y, iters=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(iters=0), "iters must be an int >= 1"),
    (dict(reg=-1.0), "reg must be a finite number >= 0"),
    (dict(solver="newton"), "solver must be one of"),
])
def test_bad_fit_arguments(kwargs, match):
  a1, a2, a3, b, x, y = _problem()
  with pytest.raises(ValueError, match=match):
    jsc.fit_attention(a1, a2, a3, b, x0=x, y0=y, **{"iters": 2, **kwargs})
  with pytest.raises(ValueError, match="non-finite"):
    jsc.fit_attention(a1, a2, a3, b.at[0, 0].set(jnp.nan), x0=x, y0=y, iters=2)
