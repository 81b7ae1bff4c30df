"""Time per cut and error of every backend, against same-run baselines.

Baselines measured in the same run:
  * plain JAX: what a user would write — a jitted fori_loop over cuts with a
    while_loop alternation of dense matvecs (no incremental images, R updated
    after every cut);
  * one streaming read of R (a jitted sum of the matrix): the memory floor of
    any method that has to look at R once per cut.

Rows: the project's jnp oracle, the FFI kernel with the scalar and the AVX-512
implementation (one thread and all threads). The kernel's time per cut is
the marginal one, (T(w_big) − T(w_small)) / (w_big − w_small), so it excludes
the one-time set-up (copy and transpose of A); other rows are T(w)/w. Errors
are at the common small width of each size, so rows are comparable.

Usage:
  python benchmarks/decompose_benchmark.py              # 512² .. 2048², batch
  python benchmarks/decompose_benchmark.py --big        # + 4096²
  python benchmarks/decompose_benchmark.py --rate-half  # + 4096² at rate ½ end to end
  python benchmarks/decompose_benchmark.py --markdown benchmarks/RESULTS.md

The machine is shared: medians over repeats, ratios against baselines from
the same run.
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
import numpy as np

import jax_signedcut as sc
from jax_signedcut._kernels import greedy as _ffi
from jax_signedcut._signedcut import start as _start

HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames="width")
def plain_jax(a, key, *, width):
  """The dense alternation a user would write (baseline)."""
  m, n = a.shape

  def cut(j, st):
    r, s_all, t_all, c_all = st
    t0 = jax.random.rademacher(jax.random.fold_in(key, j), (n,), jnp.float32)

    def body(x):
      _, t, g, _ = x
      s = jnp.where(jnp.matmul(r, t, precision=HI) < 0, -1.0, 1.0)
      v = jnp.matmul(s, r, precision=HI)
      g_new = jnp.sum(jnp.abs(v))
      better = g_new > g
      t = jnp.where(better, jnp.where(v < 0, -1.0, 1.0), t)
      return s, t, jnp.maximum(g, g_new), better

    s, t, _, _ = jax.lax.while_loop(lambda x: x[3], body,
                                    (jnp.ones(m), t0, jnp.float32(-jnp.inf), True))
    c = jnp.dot(s, jnp.matmul(r, t, precision=HI), precision=HI) / (m * n)
    return (r - c * jnp.outer(s, t), s_all.at[j].set(s), t_all.at[j].set(t), c_all.at[j].set(c))

  init = (a, jnp.zeros((width, m)), jnp.zeros((width, n)), jnp.zeros((width,)))
  r, *_ = jax.lax.fori_loop(0, width, cut, init)
  return jnp.sqrt(jnp.sum(r * r) / jnp.sum(a * a))


def timed(fn, repeats):
  """Median wall seconds (and, in CPU[fn], median CPU seconds of all threads)."""
  jax.block_until_ready(fn())  # compile + warm up
  times, cpus = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
  timed.cpu = statistics.median(cpus)
  return statistics.median(times), out


def kernel_run(a, width, impl, threads, key):
  words = _start.start_words(key, width, a.shape[-1])
  fn = jax.jit(functools.partial(_ffi.greedy, impl=impl, num_threads=threads))
  return lambda: fn(a[None], words)


def err_of(a, out, width):
  f = sc.SignedCut(out[0][0, :width], out[1][0, :width], out[2][0, :width],
                   jnp.minimum(out[3][0], width), shape=a.shape)
  return float(sc.relative_error(a, f))


SIZES = {512: (64, 1024), 1024: (32, 512), 2048: (16, 384), 4096: (8, 256)}


def bench_size(n, repeats, impls, threads):
  w_small, w_big = SIZES[n]
  key = jax.random.key(0)
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  rows = []
  reps = max(1, repeats if n <= 1024 else repeats // 2)

  t_read, _ = timed(lambda: jax.jit(jnp.sum)(a), 7)
  t_plain, e_plain = timed(lambda: plain_jax(a, key, width=w_small), reps)
  rows.append(("plain JAX loop", t_plain / w_small, timed.cpu / w_small, float(e_plain)))
  if n <= 2048:  # the oracle is the same dense alternation; 4096² would take minutes
    jnp_run = jax.jit(functools.partial(sc.decompose, width=w_small, backend="jnp"))
    t_jnp, f = timed(lambda: jnp_run(a, key=key), reps)
    rows.append(("jnp oracle", t_jnp / w_small, timed.cpu / w_small,
                 float(sc.relative_error(a, f))))
  for impl in impls:
    for th in threads:
      if impl == "scalar" and th != 1 and n > 1024:
        continue
      t1, out = timed(kernel_run(a, w_small, impl, th, key), reps)
      c1 = timed.cpu
      t2, _ = timed(kernel_run(a, w_big, impl, th, key), reps)
      dw = w_big - w_small
      rows.append((f"ffi {impl} {th}T", (t2 - t1) / dw, (timed.cpu - c1) / dw,
                   err_of(a, out, w_small)))
  return t_read, t_plain / w_small, rows


BATCH_WIDTH = 963


def bench_batch(repeats):
  a = jax.random.normal(jax.random.key(2), (64, 256, 256), jnp.float32)
  # Rate ½ of a 256² matrix (963 cuts). At w = 128 (~3 ms per matrix) two
  # threads gain as much (1.98× quiet); with another job holding one of the two
  # cores they gain nothing, so run this on an idle machine.
  words = _start.start_words(jax.random.key(0), BATCH_WIDTH, 256)
  res = {}
  for th in (1, 2):
    fn = jax.jit(jax.vmap(lambda x, th=th: _ffi.greedy(x[None], words, num_threads=th)))
    res[th], _ = timed(lambda fn=fn: fn(a), repeats)
    res[th, "cpu"] = timed.cpu
  return res


def rate_half():
  n = 4096
  w = sc.width_for_rate(n, n, 0.5)
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  jax.block_until_ready(a)
  t, c = time.perf_counter(), time.process_time()
  f = jax.block_until_ready(sc.decompose(a, key=jax.random.key(0), width=w))
  dt, dc = time.perf_counter() - t, time.process_time() - c
  return w, dt, dc, float(sc.relative_error(a, f))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--big", action="store_true", help="include 4096²")
  p.add_argument("--rate-half", action="store_true", help="4096² at rate ½ end to end")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--markdown", help="also write the tables to this markdown file")
  args = p.parse_args()

  impls = ["scalar"] + (["avx512"] if _ffi.avx512_supported() else [])
  threads = [1, 2]
  sizes = [512, 1024, 2048] + ([4096] if args.big else [])
  lines = []

  def out(s=""):
    print(s, flush=True)
    lines.append(s)

  load = os.getloadavg()
  out(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
      f"auto kernel = {_ffi.kernel_name()}, load average at start {load[0]:.1f}")
  out()
  out("| size | backend | ms / cut (wall) | CPU ms / cut (all threads) | error at w "
      "| × plain JAX (wall) | × one read of R (wall) |")
  out("|---|---|---:|---:|---:|---:|---:|")
  for n in sizes:
    t_read, t_plain, rows = bench_size(n, args.repeats, impls, threads)
    w_small = SIZES[n][0]
    out(f"| {n}² | one streaming read of R | {1e3 * t_read:.2f} | | | | 1.00 |")
    for name, t, cpu, e in rows:
      out(f"| {n}² | {name} | {1e3 * t:.2f} | {1e3 * cpu:.2f} | {e:.4f} (w={w_small}) | "
          f"{t_plain / t:.1f} | {t / t_read:.2f} |")
  res = bench_batch(args.repeats)
  out()
  out(f"| batch 64 × 256², w={BATCH_WIDTH} (rate ½), vmap | seconds (wall) | CPU seconds "
      "| speed-up (wall) |")
  out("|---|---:|---:|---:|")
  out(f"| 1 thread | {res[1]:.3f} | {res[1, 'cpu']:.3f} | 1.00 |")
  out(f"| 2 threads | {res[2]:.3f} | {res[2, 'cpu']:.3f} | {res[1] / res[2]:.2f} |")
  if args.rate_half:
    w, dt, dc, e = rate_half()
    out()
    out(f"4096² at rate ½ (w = {w}), decompose(backend='auto') end to end: "
        f"{dt:.1f} s wall, {dc:.1f} s CPU, relative error {e:.4f}")
  out()
  out(f"load average at end {os.getloadavg()[0]:.1f}")
  if args.markdown:
    with open(args.markdown, "a") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
