"""The H-aware cut search: the C++ FFI handler against the jnp reference, same run.

For MiniLM's kernel shapes (in × out) and a budget of ``--bits`` per weight
(width = bits·m·n / (m + n) cuts), times ``_hcut`` (all cuts from random
starts) and one ``_hcut_backfit`` pass over its cuts, each jitted, compiled
first, then ``--repeats`` interleaved runs per implementation; prints medians,
the ratio jnp / ffi, the searches' rounds and flips, and the relative output
error each reaches (the two implementations run the same search, so the
errors agree to rounding; the factors are compared exactly in
tests/test_hcut_search.py).

W is random normal and H = XᵀX/N from N synthetic inputs with
gamma-distributed channel scales: the shapes are MiniLM's, the errors are
only for comparing the columns. Run with ``OPENBLAS_NUM_THREADS=1`` for the
single-thread figures quoted in docs/calibration.md.

Run: ``python benchmarks/hcut_search_benchmark.py [--bits 4] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._calibration import objective

SHAPES = [(384, 384), (384, 1536), (1536, 384)]


def problem(m, n, seed=0, tokens=4096):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, m)) * rng.gamma(1.0, size=m)
  w = rng.normal(size=(m, n))
  return jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x / tokens, jnp.float32)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--bits", type=float, default=4.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--max-flips", type=int, default=64)
  args = p.parse_args()
  impls = ("jnp", "ffi")
  print(f"jax {jax.__version__}, {args.bits:g} bits per weight, max_flips {args.max_flips}, "
        f"{args.repeats} interleaved repeats, medians")
  print("| shape (in × out) | cuts | step | jnp s | ffi s | jnp / ffi | rounds jnp / ffi "
        "| flips jnp / ffi | rel. output error jnp / ffi |")
  print("|---|---|---|---|---|---|---|---|---|")
  for m, n in SHAPES:
    w, h = problem(m, n)
    width = int(args.bits * m * n / (m + n))
    key = jax.random.key(0)

    def hcut(impl):
      return objective._hcut(w, h, key, width=width, max_flips=args.max_flips,  # noqa: SLF001
                             max_rounds=50, impl=impl, stats=True)

    start = jax.block_until_ready(hcut("jnp"))
    s, t, c = start[:3]

    def backfit(impl):
      return objective._hcut_backfit(w, h, s, t, c, passes=1,  # noqa: SLF001
                                     max_flips=args.max_flips, max_rounds=50, impl=impl,
                                     stats=True)

    for step, fn in (("hcut", hcut), ("1 backfit pass", backfit)):
      out = {i: jax.block_until_ready(fn(i)) for i in impls}        # compile
      times = {i: [] for i in impls}
      for _ in range(args.repeats):
        for i in impls:
          t0 = time.perf_counter()
          jax.block_until_ready(fn(i))
          times[i].append(time.perf_counter() - t0)
      med = {i: statistics.median(times[i]) for i in impls}
      err = {}
      for i in impls:
        si, ti, ci = out[i][:3]
        err[i] = float(objective.relative_output_error(w, si.T @ (ci[:, None] * ti), h))
      cnt = {i: np.asarray(out[i][-1]) for i in impls}
      print(f"| {m} × {n} | {width} | {step} | {med['jnp']:.2f} | {med['ffi']:.2f} | "
            f"{med['jnp'] / med['ffi']:.1f}× | {cnt['jnp'][0]} / {cnt['ffi'][0]} | "
            f"{cnt['jnp'][1]} / {cnt['ffi'][1]} | {err['jnp']:.4f} / {err['ffi']:.4f} |",
            flush=True)


if __name__ == "__main__":
  main()
