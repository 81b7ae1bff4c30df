"""From how many rows a bf16 apply core beats the f32 AVX-512 core, on this CPU.

``auto`` takes a bf16 core (AMX, else AVX512-BF16) only from ``BF16_MIN_ROWS[core]``
rows (``jax_signedcut/_kernels/apply.py``). This times, for a few shapes and small
batches, the f32 ``avx512`` core (the baseline, same run), the best bf16 core of this
CPU in its default two-half mode and in the opt-in single pass
(``precision="bf16_bf16_f32"``), interleaved round by round, and prints medians and
ratios to the f32 core. Factors are random sign bits (any valid SignedCut costs the
same to apply).

Usage::

  python benchmarks/bf16_threshold_benchmark.py [--rounds 7] [--batches 8,16,24,32,48,64]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._kernels import apply as _apply
from jax_signedcut._signedcut.factors import SignedCut

SHAPES = ((4096, 4096, 16320), (4096, 4096, 8160), (384, 1536, 768), (1536, 384, 768),
          (384, 384, 768))


def random_factors(m, n, w, seed=0):
  rng = np.random.default_rng(seed)
  words = lambda k: (k + 31) // 32  # noqa: E731
  s = rng.integers(0, 2**32, size=(w, words(m)), dtype=np.uint32)
  t = rng.integers(0, 2**32, size=(w, words(n)), dtype=np.uint32)
  c = rng.standard_normal(w).astype(np.float32)
  return SignedCut(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), jnp.int32(w), (m, n))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--batches", default="8,16,24,32,48,64")
  args = p.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  best = next((c for c in ("amx", "avx512_bf16") if _try(c)), None)
  if best is None or not _try("avx512"):
    raise SystemExit("this CPU has no bf16 apply core (or no AVX-512): nothing to compare")
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, bf16 core {best}, "
        f"BF16_MIN_ROWS {_apply.BF16_MIN_ROWS}; {args.rounds} interleaved rounds, medians; "
        f"load average at start {' '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
  print(f"| shape (m x n), w | rows | f32 avx512 ms | {best} ms | {best} 1-pass ms "
        f"| {best} / f32 | 1-pass / f32 | auto runs |")
  print("|---|---:|---:|---:|---:|---:|---:|---|")
  cores = {"f32": ("avx512", None), "bf16": (best, None), "1p": (best, "bf16_bf16_f32")}
  for m, n, w in SHAPES:
    f = random_factors(m, n, w)
    for b in batches:
      x = jax.random.normal(jax.random.key(b), (b, m), jnp.float32)
      fns = {k: jax.jit(lambda x, f, core=core, prec=prec: _apply.apply_ffi(
          x, f, core=core, precision=prec)) for k, (core, prec) in cores.items()}
      for fn in fns.values():
        fn(x, f).block_until_ready()
      reps = max(1, int(2e8 // (b * w * (m + n))))
      times = {k: [] for k in fns}
      for _ in range(args.rounds):
        for k, fn in fns.items():
          t0 = time.perf_counter()
          for _ in range(reps):
            y = fn(x, f)
          y.block_until_ready()
          times[k].append((time.perf_counter() - t0) / reps * 1e3)
      med = {k: statistics.median(v) for k, v in times.items()}
      auto = _apply.apply_core("auto", rows=b, work=b * w * (m + n))
      print(f"| {m}x{n}, {w} | {b} | {med['f32']:.3f} | {med['bf16']:.3f} | {med['1p']:.3f} | "
            f"{med['bf16'] / med['f32']:.2f} | {med['1p'] / med['f32']:.2f} | {auto} |",
            flush=True)
  print(f"\nload average at end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


def _try(core):
  try:
    _apply.apply_core(core)
  except ValueError:
    return False
  return True


if __name__ == "__main__":
  main()
