"""SignedCutDense vs nnx.Linear on a 4096×4096 layer: time per call and parameter bytes.

Two regimes, both measured in one run with the layers interleaved round by
round (so machine load hits all of them alike), reported as medians and as
ratios to the f32 ``nnx.Linear`` of the same regime and run:

* **warm**: the layer is called again right after its previous call, so its
  parameters may sit in the CPU caches (this VM reports a large shared L3);
* **cold**: before every timed call a read-only pass over a 1 GiB numpy array
  pushes the parameters out of the caches, as in a model whose weights do not
  fit in cache, where every layer's weights come from DRAM. The flush only
  reads, so it leaves no dirty lines to write back and no XLA threads busy.

Factors are random sign bits (any valid SignedCut costs the same to apply); no
decomposition is run. Rows: the packed-apply CPU kernel as ``"auto"`` runs it
(``ffi``: the core named in brackets, a bf16 core — AMX or AVX512-BF16, x
rounded to bf16 — from 8 rows where the CPU has one), the same kernel with
``precision="bf16_bf16_f32"`` (``ffi 1-pass``: p rounded to one bf16 as well,
the opt-in single-pass mode), with ``precision="highest"`` (``ffi f32``: the
f32 AVX-512 or scalar core), and
optionally (``--jnp``) the pure-JAX blocked path (``impl="jnp"``, what other
platforms use); below the table, the time of one expansion for ``dense=True``
and the batch from which it pays.

Usage:
  python benchmarks/dense_benchmark.py [--size 4096] [--rounds 15] [--batches 1,8,64,512]
                                       [--jnp] [--no-f32] [--no-expand] [--markdown FILE]
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
from flax import nnx

import jax_signedcut as sc
from jax_signedcut._kernels import apply as _apply
from jax_signedcut.nnx import SignedCutDense


def _bytes(module) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(module)))


def _runner(module, impl=None, precision=None):
  graphdef, state = nnx.split(module)
  if impl is None:
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  else:
    def fn_(s, x):
      layer = nnx.merge(graphdef, s)
      return _apply.apply_signed_cut(x, layer.factors, layer.bias[...], impl=impl,
                                     precision=precision)
    fn = jax.jit(fn_)
  return lambda x: fn(state, x)


def _time(run, x) -> float:
  """Wall seconds of one call."""
  t = time.perf_counter()
  jax.block_until_ready(run(x))
  return time.perf_counter() - t


_FLUSH = None


def _flush() -> None:
  """Reads 1 GiB (more than this VM's reported L3) so that the next call starts cold."""
  global _FLUSH  # noqa: PLW0603
  if _FLUSH is None:
    _FLUSH = np.ones(1 << 28, np.float32)
  _FLUSH.sum()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=4096)
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--batches", default="1,8,64,512")
  ap.add_argument("--jnp", action="store_true", help="also time the pure-JAX path")
  ap.add_argument("--no-f32", action="store_true", help="skip the kernel's f32 rows")
  ap.add_argument("--no-expand", action="store_true", help="skip timing dense=True's expansion")
  ap.add_argument("--markdown", default=None, help="also write the table to this file")
  args = ap.parse_args()
  load = os.getloadavg()
  m = n = args.size
  batches = [int(b) for b in args.batches.split(",")]
  rngs = nnx.Rngs(0)
  layers = {
      "nnx.Linear f32": (nnx.Linear(m, n, rngs=rngs), None, None),
      "nnx.Linear bf16": (nnx.Linear(m, n, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                     rngs=rngs), None, None),
  }
  for rate in (0.5, 0.25):
    w = sc.width_for_rate(m, n, rate)
    layer = SignedCutDense(m, n, width=w, rngs=nnx.Rngs(1))
    layers[f"SignedCutDense rate {rate:g} (w={w}) ffi"] = (layer, "ffi", None)
    layers[f"SignedCutDense rate {rate:g} (w={w}) ffi 1-pass"] = (layer, "ffi", "bf16_bf16_f32")
    if not args.no_f32:
      layers[f"SignedCutDense rate {rate:g} (w={w}) ffi f32"] = (layer, "ffi", "highest")
    if args.jnp:
      layers[f"SignedCutDense rate {rate:g} (w={w}) jnp"] = (layer, "jnp", None)
  rows = []
  for batch in batches:
    x = jax.random.normal(jax.random.key(2), (batch, m))
    runs = {}
    for name, (layer, impl, precision) in layers.items():
      if impl == "ffi" and not _apply._has_ffi_kernel():  # noqa: SLF001
        continue
      xin = x.astype(jnp.bfloat16) if "bf16" in name else x
      run = _runner(layer, impl, precision)
      jax.block_until_ready(run(xin))  # compile
      if impl == "ffi":
        w_ = layer.factors.width
        exact = _apply.check_precision(precision) == "highest"
        core = _apply.apply_core("auto", exact=exact, rows=batch,
                                 work=batch * w_ * (m + n))
        name = f"{name} [{core}]"
      runs[name] = (run, xin, layer)
    warm = {name: [] for name in runs}
    cold = {name: [] for name in runs}
    rounds = args.rounds if batch <= 8 else max(3, args.rounds // 3)
    for _ in range(rounds):
      for name, (run, xin, _) in runs.items():
        _time(run, xin)
        warm[name].append(_time(run, xin))
        _flush()
        cold[name].append(_time(run, xin))
    wbase = statistics.median(warm["nnx.Linear f32"])
    cbase = statistics.median(cold["nnx.Linear f32"])
    for name in runs:
      wmed, cmed = statistics.median(warm[name]), statistics.median(cold[name])
      rows.append((batch, name, wmed * 1e3, wmed / wbase, cmed * 1e3, cmed / cbase,
                   _bytes(runs[name][2])))

  # dense=True pays for expanding the factors on every call: time it once at rate ½.
  w = sc.width_for_rate(m, n, 0.5)
  t_expand = None
  if not args.no_expand:
    layer = SignedCutDense(m, n, width=w, rngs=nnx.Rngs(1))
    expand = jax.jit(lambda f: sc.reconstruct(f))
    jax.block_until_ready(expand(layer.factors))
    t_expand = statistics.median(_time(lambda _: expand(layer.factors), None) for _ in range(2))

  lines = [
      f"SignedCutDense vs nnx.Linear, {m}x{n}; {platform.machine()} {os.cpu_count()} cores, "
      f"jax {jax.__version__}, backend {jax.default_backend()}; medians of interleaved rounds, warm and cold (see the docstring)",
      "",
      f"load average before the run: {' '.join(f'{v:.1f}' for v in load)}; after: "
      f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}",
      "",
      "| batch | layer | warm ms | × Linear f32 (warm) | cold ms | × Linear f32 (cold) "
      "| param bytes |",
      "|---:|---|---:|---:|---:|---:|---:|",
  ]
  for batch, name, wms, wratio, cms, cratio, nbytes in rows:
    lines.append(f"| {batch} | {name} | {wms:.2f} | {wratio:.2f} | {cms:.2f} | {cratio:.2f} "
                 f"| {nbytes:,} |")
  if t_expand is not None:
    lines += ["", f"Expanding rate-½ factors to a dense kernel (dense=True, per call): "
              f"{t_expand * 1e3:.0f} ms."]
  per_row = {}
  for batch, name, _, _, ms, *_ in rows:
    if batch == max(batches):
      per_row[name] = ms / batch
  lin = per_row.get("nnx.Linear f32")
  fac = min((v for k, v in per_row.items() if k.startswith(f"SignedCutDense rate 0.5 (w={w})")),
            default=None)
  if t_expand is not None and lin is not None and fac is not None and fac > lin:
    lines.append(f"dense=True beats the factored product from batch ≈ "
                 f"{t_expand * 1e3 / (fac - lin):.0f} (expansion / (factored − dense) per row "
                 f"at batch {max(batches)}).")
  text = "\n".join(lines)
  print(text)
  if args.markdown:
    with open(args.markdown, "w") as fh:
      fh.write(text + "\n")


if __name__ == "__main__":
  main()
