"""Greedy kernel time per cut in full reads of R, against baselines from the same run.

For each shape, rounds interleave (so that the load of this shared machine
hits all of them alike):

  * the baseline, one full read of the matrix: ``jax.jit(jnp.sum)(a)`` over the
    whole array (not a column reduction, which XLA runs 2-3x slower), which
    XLA runs on all cores;
  * the kernel at w = 32 and w = 96 cuts: the time per cut is the marginal
    (T(96) - T(32)) / 64, which holds exactly two flushes of the 32-cut
    pending block, as every 64 cuts of a long decomposition do, and leaves out
    the one-time copy and transpose of A.

Reported: medians over rounds, ms per cut, and reads per cut = (ms per cut) /
(ms per full read). Then the projection to Mistral-7B at rate 1/2 (32 layers
of q, o: 4096x4096; k, v: 4096x1024; gate, up: 4096x14336; down:
14336x4096, in the Flax (in, out) layout) from the measured per-cut times,
4096x1024 scaled from 4096x4096 by its entry count.

With ``--compare-with OLD.so`` (another build's ``_signedcut_ffi`` extension,
e.g. a copy of the release's) the same rounds also time that build's kernel,
registered under its own target name, so before and after come from one run.

Usage:
  python benchmarks/greedy_limits_benchmark.py [--rounds 5] [--threads 1,2]
      [--shapes 4096x4096,14336x4096,4096x14336] [--compare-with OLD.so] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import jax_signedcut as sc
from jax_signedcut._kernels import greedy as _ffi
from jax_signedcut._signedcut import start as _start

W_SMALL, W_BIG = 32, 96

MISTRAL = {  # (in, out): count per layer
    (4096, 4096): 2, (4096, 1024): 2, (4096, 14336): 2, (14336, 4096): 1}
MISTRAL_LAYERS = 32


def _wall(fn):
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def load_other_build(path):
  """Registers another build's greedy handler as target "signedcut_greedy_other"."""
  import importlib.util  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import types  # noqa: PLC0415
  pkg = types.ModuleType("_other_build")
  pkg.__path__ = [os.path.dirname(os.path.abspath(path))]
  sys.modules["_other_build"] = pkg
  spec = importlib.util.spec_from_file_location("_other_build._signedcut_ffi", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  jax.ffi.register_ffi_target("signedcut_greedy_other", mod.registrations()["signedcut_greedy"],
                              platform="cpu")
  return "signedcut_greedy_other"


def bench_shape(m, n, rounds, threads, impl, targets):
  a = jax.random.normal(jax.random.key(1), (m, n), jnp.float32)
  a3 = a[None]
  read = jax.jit(jnp.sum)
  runs = {}
  keys = [(label, th) for label in targets for th in threads]
  for label, th in keys:
    for w in (W_SMALL, W_BIG):
      words = _start.start_words(jax.random.key(0), w, n)
      fn = jax.jit(functools.partial(_ffi.greedy, impl=impl, num_threads=th,
                                     target=targets[label]))
      runs[label, th, w] = functools.partial(fn, a3, words)
  for f in (lambda: read(a), *runs.values()):
    jax.block_until_ready(f())  # compile + warm
  t_read, per_cut = [], {k: [] for k in keys}
  for _ in range(rounds):
    t_read.append(min(_wall(lambda: read(a)) for _ in range(3)))
    for label, th in keys:
      small = _wall(runs[label, th, W_SMALL])
      big = _wall(runs[label, th, W_BIG])
      per_cut[label, th].append((big - small) / (W_BIG - W_SMALL))
  return (statistics.median(t_read),
          {k: statistics.median(v) for k, v in per_cut.items()},
          {k: (min(v), max(v)) for k, v in per_cut.items()})


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--threads", default="1,2")
  ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
  ap.add_argument("--impl", default="auto")
  ap.add_argument("--compare-with", default=None,
                  help="another build's _signedcut_ffi extension to time in the same rounds")
  ap.add_argument("--markdown", default=None, help="also append the tables to this file")
  args = ap.parse_args()
  targets = {"this build": _ffi.TARGET}
  if args.compare_with:
    targets = {"other build": load_other_build(args.compare_with), **targets}
  threads = [int(t) for t in args.threads.split(",")]
  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
  lines = []

  def out(s=""):
    print(s, flush=True)
    lines.append(s)

  out(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, kernel = {_ffi.kernel_name(args.impl)}, "
      f"jax {jax.__version__}; {args.rounds} interleaved rounds, medians; "
      f"load average at start {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  out()
  out("| shape (m x n) | full read (jnp.sum) ms | kernel | threads | ms / cut "
      "| min-max ms / cut | reads of R / cut |")
  out("|---|---:|---|---:|---:|---:|---:|")
  per_cut = {}
  for m, n in shapes:
    t_read, med, rng = bench_shape(m, n, args.rounds, threads, args.impl, targets)
    for (label, th), t in med.items():
      if label == "this build":
        per_cut[m, n, th] = t
      out(f"| {m}x{n} | {1e3 * t_read:.2f} | {label} | {th} | {1e3 * t:.2f} "
          f"| {1e3 * rng[label, th][0]:.2f}-{1e3 * rng[label, th][1]:.2f} | {t / t_read:.2f} |")
  out()
  if all((m, n) in [(s[0], s[1]) for s in shapes]
         for m, n in [(4096, 4096), (4096, 14336), (14336, 4096)]):
    for th in threads:
      total = 0.0
      parts = []
      for (m, n), cnt in MISTRAL.items():
        t = per_cut.get((m, n, th))
        if t is None:  # 4096x1024: scaled from 4096² by the entry count
          t = per_cut[4096, 4096, th] * (m * n) / (4096 * 4096)
        w = sc.width_for_rate(m, n, 0.5)
        total += cnt * MISTRAL_LAYERS * w * t
        parts.append(f"{m}x{n}: w={w}, {1e3 * t:.2f} ms/cut")
      out(f"Mistral-7B at rate 1/2, {th} thread(s): {total / 3600:.1f} h of greedy "
          f"({'; '.join(parts)}; {MISTRAL_LAYERS} layers)")
  out()
  out(f"load average at end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  if args.markdown:
    with open(args.markdown, "a") as fh:
      fh.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
  main()
