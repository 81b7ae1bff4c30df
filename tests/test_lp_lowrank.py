"""Robust ℓp rank-k approximation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as jsc


def _svd_projection(a, k):
  _, _, vt = jnp.linalg.svd(a, full_matrices=False)
  return a @ vt[:k].T @ vt[:k]


def _max_principal_angle(v1, v2):
  """Largest principal angle between the row spaces of v1 (k, n) and v2 (k, n)."""
  q1, _ = np.linalg.qr(np.asarray(v1, np.float64).T)
  q2, _ = np.linalg.qr(np.asarray(v2, np.float64).T)
  cos = np.linalg.svd(q1.T @ q2, compute_uv=False)
  return float(np.arccos(np.clip(cos.min(), -1, 1)))


@pytest.mark.parametrize("shape,k", [((40, 12), 3), ((9, 30), 9), ((33, 1), 1)])
def test_p2_is_the_truncated_svd_projection(shape, k):
  a = jax.random.normal(jax.random.key(shape[0]), shape)
  f = jsc.lp_lowrank(a, rank=k, p=2, iters=5)
  np.testing.assert_allclose(jsc.reconstruct_lowrank(f), _svd_projection(a, k), atol=1e-4)
  np.testing.assert_allclose(f.v @ f.v.T, np.eye(k), atol=1e-5)   # V orthonormal


def _planted(seed=0, m_in=200, m_out=20, n=20, k=3):
  # 20 outlier rows ~ 10x the inliers' norm: they hold most of the energy,
  # so the SVD turns towards them, yet an l1 fit still prefers the inliers.
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed), 5)
  basis, _ = jnp.linalg.qr(jax.random.normal(k1, (n, k)))       # inlier subspace (n, k)
  inliers = jax.random.normal(k2, (m_in, k)) @ basis.T + 0.01 * jax.random.normal(k3, (m_in, n))
  outliers = 3.0 * jax.random.normal(k4, (m_out, n))
  a = jnp.concatenate([inliers, outliers])[jax.random.permutation(k5, m_in + m_out)]
  return a, basis.T


def test_p1_subspace_is_closer_to_inliers_than_svd():
  a, truth = _planted()
  _, _, vt = jnp.linalg.svd(a, full_matrices=False)
  svd_angle = _max_principal_angle(vt[:3], truth)
  f = jsc.lp_lowrank(a, rank=3, p=1, iters=30)
  lp_angle = _max_principal_angle(f.v, truth)
  assert svd_angle > 1.0                 # the outliers really do pull the SVD away
  assert lp_angle < 0.05, (lp_angle, svd_angle)
  # And the ℓ1 objective went down from the SVD start (IRLS is monotone).
  start = jsc.lp_lowrank(a, rank=3, p=1, iters=0)
  assert float(jsc.lp_cost(a, f, 1)) < float(jsc.lp_cost(a, start, 1))


def test_irls_objective_never_increases():
  a, _ = _planted(seed=1, m_out=30)
  costs = [float(jsc.lp_cost(a, jsc.lp_lowrank(a, rank=3, p=1.3, iters=i), 1.3))
           for i in (0, 1, 2, 4, 8)]
  assert all(c1 <= c0 * (1 + 1e-5) for c0, c1 in zip(costs, costs[1:])), costs


def test_jit_vmap_batch():
  a = jax.random.normal(jax.random.key(2), (3, 25, 10))
  one = lambda x: jsc.reconstruct_lowrank(jsc.lp_lowrank(x, rank=2, p=1.5, iters=4))  # noqa: E731
  eager = jnp.stack([one(a[i]) for i in range(3)])
  for out in (one(a), jax.jit(one)(a), jax.vmap(one)(a)):
    np.testing.assert_allclose(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=2, p=0.5), ValueError, r"p must be a number in \[1, 2\], got 0.5"),
    (dict(rank=2, p=2.5), ValueError, r"p must be a number in \[1, 2\], got 2.5"),
    (dict(rank=0, p=1), ValueError, r"rank must be in 1..min\(m, n\) = 1..4"),
    (dict(rank=5, p=1), ValueError, r"rank must be in 1..min\(m, n\) = 1..4"),
    (dict(rank=2, p=1, iters=-1), ValueError, "iters must be >= 0"),
    (dict(rank=2, p=1, eps=0), ValueError, "eps must be"),
])
def test_bad_arguments(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    jsc.lp_lowrank(jnp.ones((6, 4)), **kwargs)


def test_bad_inputs():
  with pytest.raises(TypeError, match="dtype int32"):
    jsc.lp_lowrank(jnp.ones((6, 4), jnp.int32), rank=2, p=1)
  with pytest.raises(ValueError, match="non-finite"):
    jsc.lp_lowrank(jnp.ones((6, 4)).at[0, 0].set(jnp.nan), rank=2, p=1)
