"""Demo: error of the signed cut decomposition of a Gaussian matrix vs width.

Prints, for one n×n N(0,1) matrix, the relative Frobenius error at several
widths (one decomposition at the largest width; lower widths are its
prefixes), next to the storage in bits per weight and the error of plain bf16
rounding. Run: ``python examples/error_vs_width.py [--n 512] [--backend auto]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import jax_signedcut as sc


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=512, help="matrix size (default 512)")
  p.add_argument("--backend", default="auto", choices=("auto", "jnp", "ffi"))
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  n = args.n
  a = jax.random.normal(jax.random.key(args.seed + 1), (n, n), jnp.float32)
  widths = [n // 2, n, 2 * n, 3 * n, 4 * n, 6 * n, 7 * n]
  t0 = time.perf_counter()
  f = sc.decompose(a, key=jax.random.key(args.seed), width=widths[-1], backend=args.backend)
  jax.block_until_ready(f)
  dt = time.perf_counter() - t0
  bf16_err = float(jnp.linalg.norm(a - a.astype(jnp.bfloat16).astype(jnp.float32)) /
                   jnp.linalg.norm(a))
  print(f"{n}x{n} N(0,1) float32, backend={args.backend}: {widths[-1]} cuts in {dt:.1f} s "
        f"({1e3 * dt / widths[-1]:.2f} ms/cut incl. compile)")
  print(f"{'width':>7} {'bits/weight':>12} {'rel. error':>11}")
  for w in widths:
    g = sc.truncate(f, w)
    bits = 8 * sc.nbytes(g) / (n * n)
    print(f"{w:>7} {bits:>12.2f} {float(sc.relative_error(a, g)):>11.5f}")
  print(f"{'bf16':>7} {16:>12.2f} {bf16_err:>11.5f}")


if __name__ == "__main__":
  main()
