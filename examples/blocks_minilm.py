"""Per kernel: the calibrated block search (``options={"blocks": k}``) against one block and GPTQ.

For chosen MiniLM kernels, the relative output error ``sqrt(tr(EᵀHE) / tr(WᵀHW))`` of

* plain signed cuts (``outliers="auto"``, no statistics),
* GPTQ int-b per output channel (on the calibration statistics),
* calibrated cuts (``--search``: ``diag`` by default, ``hcut`` the H-aware search; the
  per-kind sparse share of the main job) in k = 1, 2, 4 input-row blocks (k = 1: the
  pipeline without blocks),

under H of the calibration texts (what they were fitted on) and of the held-out
development texts (``DEVELOPMENT``; never the evaluation texts). This is the
measurement that chose ``examples/compress_minilm.py``'s ``BLOCKS_BY_KIND``.

Usage::

  python examples/blocks_minilm.py --bits 4 --layers 1,4
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jax_signedcut as sc  # noqa: E402
from jax_signedcut._calibration import gptq, objective  # noqa: E402
from jax_signedcut._core.tree import leaf_key, leaf_path  # noqa: E402
from jax_signedcut.models import bert  # noqa: E402
from jax_signedcut.models.calibration_texts import CALIBRATION, DEVELOPMENT  # noqa: E402

SPARSE = {"output": 0.005, "attention_out": 0.002, "intermediate": 0.002}
KINDS = ("query", "key", "value", "attention_out", "intermediate", "output")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bits", type=float, default=4.0)
  p.add_argument("--layers", default="1,4", help="comma-separated layer indices")
  p.add_argument("--blocks", default="1,2,4", help="comma-separated block counts")
  p.add_argument("--search", default="diag",
                 help="comma-separated searches of the calibrated cuts (diag, hcut), each "
                      "optionally with backfitting passes: hcut+1 (options backfit=1)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  layers = [int(v) for v in args.layers.split(",")]
  counts = [int(v) for v in args.blocks.split(",")]
  searches = args.search.split(",")
  runs = [(s, k) for s in searches for k in counts]
  # "diag+3": search diag with 3 backfitting passes.
  spec = {s: (s.split("+")[0], int(s.split("+")[1]) if "+" in s else 0) for s in searches}

  model = bert.load_safetensors()
  tok = bert.load_tokenizer()
  t0 = time.perf_counter()
  cal = bert.calibrate_texts(model, tok, CALIBRATION).hessians
  dev = bert.calibrate_texts(model, tok, DEVELOPMENT).hessians
  print(f"statistics: {time.perf_counter() - t0:.1f} s")
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
  params = {leaf_path(kp): v for kp, v in flat}
  key = jax.random.key(args.seed)
  cols = ["plain", f"GPTQ int{int(args.bits)}"] + [
      f"{s} {k} block{'s' if k > 1 else ''}" for s, k in runs]
  print(f"\n{args.bits:g} bits per weight; relative output error, calibration H / development H\n")
  print("| kernel | shape | " + " | ".join(cols) + " |")
  print("|---|---|" + "---|" * len(cols))
  means = np.zeros((len(cols), 2))
  seconds = np.zeros(len(cols))
  n = 0
  for layer in layers:
    for kind in KINDS:
      path = f"layers/{layer}/{kind}/kernel"
      w = jnp.asarray(params[path], jnp.float32)
      h, hd = cal[path], dev[path]
      k = leaf_key(key, path)
      makers = [lambda: sc.decompose(w, key=k, bits_per_weight=args.bits),
                lambda: gptq.gptq(w, h, bits=int(args.bits))]
      for search, nb in runs:
        makers.append(lambda search=search, nb=nb: sc.decompose(
            w, key=k, bits_per_weight=args.bits, calibration=h,
            options={"search": spec[search][0], "backfit": spec[search][1], "blocks": nb,
                     "sparse_fraction": SPARSE.get(kind, 0.0)}))
      fits = []
      for i, make in enumerate(makers):
        t = time.perf_counter()
        fits.append(jax.block_until_ready(make()))
        seconds[i] += time.perf_counter() - t
      cells = []
      for i, f in enumerate(fits):
        wh = f.reconstruct()
        e = (float(objective.relative_output_error(w, wh, h)),
             float(objective.relative_output_error(w, wh, hd)))
        means[i] += e
        cells.append(f"{e[0]:.4f} / {e[1]:.4f}")
      n += 1
      print(f"| {layer} {kind} | {tuple(w.shape)} | " + " | ".join(cells) + " |", flush=True)
  print("| mean | | " + " | ".join(f"{a / n:.4f} / {b / n:.4f}" for a, b in means) + " |")
  print("| seconds (wall, compilation included) | | "
        + " | ".join(f"{t:.0f}" for t in seconds) + " |")


if __name__ == "__main__":
  main()
