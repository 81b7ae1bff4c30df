"""Dense reconstruction of signed cuts: whole 512-cut blocks against blocks of the width.

``SignedCut.reconstruct`` contracts the cuts 512 at a time, the last block padded with
empty slots, so that a value gives the same bits whatever its count of trailing empty
slots (see ``_signedcut/factors._expand``). Before, a width below 512 was contracted in
one block of that width. This prints both, interleaved in one run (median of
``--rounds``), for widths below 512 (from 512 cuts on the two are the same program).

Usage::

  python benchmarks/reconstruct_benchmark.py --rounds 7
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_signedcut as sc
from jax_signedcut._signedcut import factors

CASES = ((384, 384, 100), (384, 384, 400), (4096, 4096, 129), (4096, 4096, 400))


def _random_cuts(m, n, w, seed=0):
  rng = np.random.default_rng(seed)
  words = lambda d: rng.integers(0, 2**32, (w, (d + 31) // 32), dtype=np.uint32)  # noqa: E731
  return sc.SignedCut(s_bits=jnp.asarray(words(m)), t_bits=jnp.asarray(words(n)),
                      c=jnp.asarray(rng.uniform(0.5, 1.0, w), jnp.float32),
                      num_cuts=jnp.int32(w), shape=(m, n))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=7)
  args = p.parse_args(argv)
  print("| m × n | width | blocks of min(512, w) ms | whole 512-cut blocks ms | ratio |")
  print("|---|---:|---:|---:|---:|")
  for m, n, w in CASES:
    f = _random_cuts(m, n, w)
    fns = [jax.jit(lambda f, b=b: factors._expand(f, b))  # noqa: SLF001
           for b in (min(factors.RECONSTRUCT_BLOCK, w), factors.RECONSTRUCT_BLOCK)]
    for g in fns:
      g(f).block_until_ready()
    times = [[], []]
    for _ in range(args.rounds):
      for i, g in enumerate(fns):
        t = time.perf_counter()
        g(f).block_until_ready()
        times[i].append(time.perf_counter() - t)
    old, new = (float(np.median(t)) for t in times)
    print(f"| {m} × {n} | {w} | {old * 1e3:.1f} | {new * 1e3:.1f} | {new / old:.2f} |")


if __name__ == "__main__":
  main()
