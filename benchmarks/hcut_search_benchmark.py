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

``--variants`` times the C++ builds against each other instead, same run,
interleaved: the greedy cuts with the baseline and the AVX-512 build of the
search, and one backfit pass as the XLA loop around one search call per visit
(the path before the one-call loop), and as the one-call loop
(``BackfitLoop``) with either build. The factors of the two builds are
bit-identical (checked here too); the loop's differ from the XLA loop's only
by rounding.

Run: ``python benchmarks/hcut_search_benchmark.py [--bits 4] [--repeats 3] [--variants]``
"""

from __future__ import annotations

import argparse
import functools
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
  p.add_argument("--variants", action="store_true",
                 help="the C++ builds and the backfit loops against each other")
  args = p.parse_args()
  if args.variants:
    return variants(args)
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
      med, out = _timed({i: functools.partial(fn, i) for i in impls}, args.repeats)
      err = {}
      for i in impls:
        si, ti, ci = out[i][:3]
        err[i] = float(objective.relative_output_error(w, si.T @ (ci[:, None] * ti), h))
      cnt = {i: np.asarray(out[i][-1]) for i in impls}
      print(f"| {m} × {n} | {width} | {step} | {med['jnp']:.2f} | {med['ffi']:.2f} | "
            f"{med['jnp'] / med['ffi']:.1f}× | {cnt['jnp'][0]} / {cnt['ffi'][0]} | "
            f"{cnt['jnp'][1]} / {cnt['ffi'][1]} | {err['jnp']:.4f} / {err['ffi']:.4f} |",
            flush=True)


def _timed(fns, repeats):
  """Compile each, then ``repeats`` interleaved rounds; medians in seconds, and the outputs."""
  out = {k: jax.block_until_ready(f()) for k, f in fns.items()}
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}, out


def variants(args):
  print(f"jax {jax.__version__}, {args.bits:g} bits per weight, max_flips {args.max_flips}, "
        f"{args.repeats} interleaved repeats, medians; ms per cut (greedy) or per visit "
        "(backfit)")
  print("| shape (in × out) | cuts | greedy baseline | greedy avx512 | × | backfit XLA loop "
        "(baseline) | loop baseline | loop avx512 | XLA loop / loop avx512 |")
  print("|---|---|---|---|---|---|---|---|---|")
  for m, n in SHAPES:
    w, h = problem(m, n)
    width = int(args.bits * m * n / (m + n))
    key = jax.random.key(0)
    kw = dict(max_flips=args.max_flips, max_rounds=50, impl="ffi", stats=True)
    greedy = {k: functools.partial(objective._hcut, w, h, key, width=width, kernel=k,  # noqa: SLF001
                                   **kw) for k in ("scalar", "avx512")}
    tg, og = _timed(greedy, args.repeats)
    for a, b in zip(og["scalar"], og["avx512"]):
      assert np.array_equal(np.asarray(a), np.asarray(b)), "the two builds differ"
    s, t, c = og["scalar"][:3]
    fit = {(loop, k): functools.partial(objective._hcut_backfit, w, h, s, t, c, passes=1,  # noqa: SLF001
                                        loop=loop, kernel=k, **kw)
           for loop, k in ((False, "scalar"), (True, "scalar"), (True, "avx512"))}
    tb, _ = _timed(fit, args.repeats)
    ms = lambda sec: f"{sec / width * 1e3:.3f}"  # noqa: E731
    print(f"| {m} × {n} | {width} | {ms(tg['scalar'])} | {ms(tg['avx512'])} | "
          f"{tg['scalar'] / tg['avx512']:.2f} | {ms(tb[(False, 'scalar')])} | "
          f"{ms(tb[(True, 'scalar')])} | {ms(tb[(True, 'avx512')])} | "
          f"{tb[(False, 'scalar')] / tb[(True, 'avx512')]:.2f} |", flush=True)


if __name__ == "__main__":
  main()
