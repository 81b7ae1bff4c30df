"""Compress one attention layer, then refit it to the original outputs.

A single-head attention layer ``softmax(H W_Q W_Kᵀ Hᵀ / √d) H W_V`` (a randomly
initialised layer of a small model: nothing is downloaded) has its three
weight matrices compressed — signed cuts at 2 bits per weight, and per-row
int2 rounding for comparison. The compressed layer's output drifts from the
original; ``fit_attention`` then refits X = W_Q W_Kᵀ / √d and Y = W_V to the
original outputs on calibration inputs (Levenberg–Marquardt with variable
projection, matrix-free CG since X has d² = 4096 unknowns) and the output
error is reported on the calibration inputs and on held-out inputs.

    python examples/refit_attention.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import jax_signedcut as jsc

D = 64          # model width
N_CALIB = 512   # calibration tokens
N_TEST = 256    # held-out tokens


def layer(h, x, y):
  """softmax(H X Hᵀ) H Y: the attention layer with X = W_Q W_Kᵀ/√d, Y = W_V."""
  return jsc.attention_probs(h, h, x) @ h @ y


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main():
  kq, kk, kv, kc, kt, kd = jax.random.split(jax.random.key(0), 6)
  # Query/key weights with some shared structure so that attention is peaked,
  # as in trained layers, rather than nearly uniform.
  w_q = jax.random.normal(kq, (D, D)) / jnp.sqrt(D)
  w_k = w_q + 0.5 * jax.random.normal(kk, (D, D)) / jnp.sqrt(D)
  w_v = jax.random.normal(kv, (D, D)) / jnp.sqrt(D)
  scale = 2.0 / jnp.sqrt(D)
  h_cal = jax.random.normal(kc, (N_CALIB, D))
  h_test = jax.random.normal(kt, (N_TEST, D))
  x_true, y_true = scale * w_q @ w_k.T, w_v
  b_cal, b_test = layer(h_cal, x_true, y_true), layer(h_test, x_true, y_true)

  def by_cuts(w):
    return jsc.reconstruct(jsc.decompose(w, key=kd, bits_per_weight=2))

  def by_rtn(w):
    return jsc.dequantize_matrix(jsc.rtn(w, bits=2))

  print(f"one attention layer, d = {D}, {N_CALIB} calibration and {N_TEST} held-out tokens")
  print(f"{'compression':<22} {'calib. before':>13} {'calib. after':>12} {'held-out before':>15} "
        f"{'held-out after':>14} {'fit time':>8}")
  for name, comp in (("signed cuts, 2 bits", by_cuts), ("per-row int2 (RTN)", by_rtn)):
    w = jnp.stack([w_q, w_k, w_v])
    cq, ck, cv = comp(w)
    x0, y0 = scale * cq @ ck.T, cv
    t0 = time.perf_counter()
    fit = jsc.fit_attention(h_cal, h_cal, h_cal, b_cal, x0=x0, y0=y0, iters=10, reg=1e-3)
    fit.x.block_until_ready()
    dt = time.perf_counter() - t0
    print(f"{name:<22} {rel(layer(h_cal, x0, y0), b_cal):>13.4f} "
          f"{rel(layer(h_cal, fit.x, fit.y), b_cal):>12.4f} "
          f"{rel(layer(h_test, x0, y0), b_test):>15.4f} "
          f"{rel(layer(h_test, fit.x, fit.y), b_test):>14.4f} {dt:>7.1f}s")
  print("(relative Frobenius error of the layer output; the refit X and Y are dense d×d and")
  print(" would be compressed again for storage.)")


if __name__ == "__main__":
  main()
