"""Relative error of every method at equal bits per weight, with RTN as the same-run baseline.

For each matrix (i.i.d. Gaussian and heavy-tailed Student-t, ν = 3) and each
budget in bits per weight, prints the stored bits per weight actually used
(scales and padding included) and ‖A − Â‖_F / ‖A‖_F for: signed cuts
(``decompose``, one run at the largest width, truncated: greedy cuts are
prefix-consistent), per-row RTN on the int and uniform grids, RTN with
groups of 64 (over budget by 0.5 bit, for reference), LPLR (also with
orthonormalize=True) and DSVD with 4- and 8-bit factors. The last column is
the error relative to per-row int RTN at the same budget (< 1: better).

    python benchmarks/methods_benchmark.py [--size 256]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import jax_signedcut as jsc

BUDGETS = (2, 4, 8)


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=256)
  args = parser.parse_args()
  n = args.size
  key = jax.random.key(0)
  mats = {
      "gaussian": jax.random.normal(key, (n, n)),
      "student-t3": jax.random.t(key, 3.0, (n, n)),
  }
  print(f"{n}x{n} matrices; bits/weight = stored bits per entry incl. scales and padding")
  print(f"{'matrix':<11} {'budget':>6} {'method':<22} {'bits/w':>7} {'rel.err':>8} "
        f"{'vs int RTN':>10}")
  for name, a in mats.items():
    t0 = time.perf_counter()
    widths = {b: jsc.width_for_bits(n, n, b) for b in BUDGETS}
    cuts = jsc.decompose(a, key=key, width=max(widths.values()))
    jax.block_until_ready(cuts)
    t_cuts = time.perf_counter() - t0
    for b in BUDGETS:
      rows = []
      q = jsc.rtn(a, bits=b)
      base = rel(a, jsc.dequantize_matrix(q))
      rows.append(("RTN int, per row", q.bits_per_weight, base))
      q = jsc.rtn(a, bits=b, grid="uniform")
      rows.append(("RTN uniform, per row", q.bits_per_weight, rel(a, jsc.dequantize_matrix(q))))
      q = jsc.rtn(a, bits=b, group_size=64)      # costs b + 0.5 bits: over budget, for reference
      rows.append(("RTN int, g64", q.bits_per_weight, rel(a, jsc.dequantize_matrix(q))))
      f = jsc.truncate(cuts, widths[b])
      rows.append(("signed cuts", 8 * jsc.nbytes(f) / n**2, rel(a, jsc.reconstruct(f))))
      for fb in (4, 8):
        lf = jsc.lplr(a, key=key, bits_per_weight=b, bits=(fb, fb), scale="per_column")
        rows.append((f"LPLR ({fb},{fb}) k={lf.rank}", 8 * lf.nbytes / n**2,
                     rel(a, jsc.reconstruct_lowrank(lf))))
        if fb == 4:   # k near min(m, n): pinv(Q(A S)) A gets a huge range; orthonormalize helps
          of = jsc.lplr(a, key=key, bits_per_weight=b, bits=(fb, fb), scale="per_column",
                        orthonormalize=True)
          rows.append((f"LPLR ({fb},{fb}) orth.", 8 * of.nbytes / n**2,
                       rel(a, jsc.reconstruct_lowrank(of))))
        df = jsc.dsvd(a, bits_per_weight=b, bits=(fb, fb), scale="per_column")
        rows.append((f"DSVD ({fb},{fb}) k={df.rank}", 8 * df.nbytes / n**2,
                     rel(a, jsc.reconstruct_lowrank(df))))
      for meth, bpw, err in rows:
        print(f"{name:<11} {b:>6} {meth:<22} {bpw:>7.3f} {err:>8.4f} {err / base:>10.3f}")
    print(f"{name:<11} (signed cuts: {max(widths.values())} cuts in {t_cuts:.1f}s, jnp oracle)")


if __name__ == "__main__":
  main()
