"""The comparison table at equal bits: the main job's checkpoints against plain cuts, RTN and GPTQ.

For each budget (bits per weight over MiniLM's 38 compressed matrices: the 36
Linear kernels and the word and position embedding tables) the script measures,
in one run and on the same held-out texts:

* plain cuts: ``decompose`` of every matrix at the budget (``outliers="auto"``),
  what ``examples/compress_minilm.py --bits B`` makes;
* RTN int-b: per-output-channel absmax rounding of the kernels (``sc.rtn`` on the
  torch layout), the tables as plain cuts at the budget;
* GPTQ int-b: per-output-channel GPTQ of the kernels on the calibration
  statistics of the main job (``bert.calibrate_texts`` on ``CALIBRATION``), the
  tables as plain cuts at the budget;
* each ``--checkpoint LABEL=PATH`` (a ``compress_minilm.py`` checkpoint: its
  budget read from its own bytes), loaded into ``SignedCutDense`` layers as a
  user would run it;
* for each checkpoint whose matrices have different budgets (``--allocate``):
  **GPTQ at the checkpoint's split** — every kernel by GPTQ at integer bits near its
  allocated bits (``split_bits``: within the same total budget), the checkpoint's own
  embedding tables.
  With ``--distill`` each GPTQ row also distilled as the main job's ``--distill``
  does (``bert.distill_blocks``: GPTQ's per-row scales, biases and LayerNorm; the
  codes unchanged), the cuts' checkpoints having had that step.
  The allocation's gain is mostly the split between the tables and the kernels,
  which any kernel method can use; this row gives it to GPTQ too (once per split: a
  distilled copy with the same kernel bits and tables gets no second row).

Figures: sentence-embedding cosine to the uncompressed model on the 50
``eval_texts.SENTENCES`` (mean and worst), top-1 agreement of 20 queries × 30
passages, and the mean cosine on the ``DEVELOPMENT`` texts (where the main job's
options were chosen; the evaluation texts never were). Bits: stored bits of the
38 matrices per weight (codes + scales for RTN/GPTQ; everything the checkpoint
stores for them otherwise).

Usage (after the main-job runs that write the checkpoints)::

  python examples/table_minilm.py --bits 4 --checkpoint "calibrated=u4.safetensors" \\
      --checkpoint "+ allocation + distillation=d4.safetensors" --out table.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

import jax_signedcut as sc
from jax_signedcut._calibration import gptq
from jax_signedcut.models import bert
from jax_signedcut.models.calibration_texts import CALIBRATION, DEVELOPMENT
from jax_signedcut.models.eval_texts import ANSWERS, DOCUMENTS, QUERIES, SENTENCES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compress_minilm import flat_paths, load_factors  # noqa: E402

TABLES = ("embeddings/word/embedding", "embeddings/position/embedding")


def _cosine(a, b):
  return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class Evaluator:
  """Held-out figures of a model whose matrices are replaced by compressed values."""

  def __init__(self, model_dir, tok, layers=None):
    self.model_dir, self.tok, self.layers = model_dir, tok, layers
    base = bert.load_safetensors(model_dir, num_layers=layers)
    self.e_eval = bert.encode(base, tok, SENTENCES)
    self.e_dev = bert.encode(base, tok, DEVELOPMENT)
    self.top = self._retrieval(base)

  def _retrieval(self, model):
    q = bert.encode(model, self.tok, QUERIES)
    d = bert.encode(model, self.tok, DOCUMENTS)
    return np.argmax(q @ d.T, axis=1)

  def __call__(self, flat: dict) -> dict:
    """``flat``: ``{path: compressed or array}``; arrays (distilled biases, LayerNorm) copied in."""
    return self.of_model(self.student(flat))

  def student(self, flat: dict):
    """The model with ``flat``'s matrices (Linear kernels as ``SignedCutDense``)."""
    return bert.with_factors(bert.load_safetensors(self.model_dir, num_layers=self.layers),
                             flat, dense_leaves=True)

  def of_model(self, model) -> dict:
    cos = _cosine(self.e_eval, bert.encode(model, self.tok, SENTENCES))
    dev = _cosine(self.e_dev, bert.encode(model, self.tok, DEVELOPMENT))
    top = self._retrieval(model)
    return dict(mean=float(cos.mean()), min=float(cos.min()),
                top1=int(np.sum(top == self.top)), right=int(np.sum(top == np.array(ANSWERS))),
                dev_mean=float(dev.mean()))


def stored_bits(flat: dict, weights: dict) -> float:
  """Stored bits per weight of the compressed matrices named in ``weights``."""
  total = sum(int(np.prod(np.shape(weights[p]))) for p in weights)
  return 8 * sum(sc.nbytes(flat[p]) for p in weights) / total


def kernel_bits(f, w) -> float:
  return 8 * sc.nbytes(f) / int(np.prod(np.shape(w)))


def split_bits(per: dict, weights: dict, kernels, flat: dict, *, budget: float) -> dict:
  """Integer GPTQ bits per kernel near a checkpoint's allocation, within the same budget.

  ``per``: the checkpoint's stored bits per weight of every matrix. Each kernel starts at
  the floor of its allocated bits (2..8) and the kernels with the largest fractional parts
  get one more bit while the 38 matrices (the checkpoint's own tables, GPTQ's codes and
  scales) stay within ``budget`` bits per weight — what the cuts were held to.
  """
  size = {k: int(np.prod(np.shape(weights[k]))) for k in weights}
  cost = lambda k, q: sc.rtn_bits_per_weight(*np.shape(weights[k])[::-1], q) * size[k]  # noqa: E731
  out = {k: int(np.clip(np.floor(per[k] + 1e-6), 2, 8)) for k in kernels}
  total = sum(cost(k, out[k]) for k in kernels) + sum(
      8 * sc.nbytes(flat[t]) for t in weights if t not in out)
  room = budget * sum(size.values()) - total
  for k in sorted(kernels, key=lambda k: (-(per[k] - out[k]), k)):
    extra = cost(k, out[k] + 1) - cost(k, out[k])
    if out[k] < 8 and per[k] - out[k] > 0.25 and extra <= room:
      out[k] += 1
      room -= extra
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--bits", type=float, required=True, help="the budget of this table's rows")
  p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                 help="a compress_minilm.py checkpoint at this budget (repeatable)")
  p.add_argument("--seed", type=int, default=0, help="the key of the plain cuts (as the job's)")
  p.add_argument("--out", default=None, help="append the markdown rows to this file")
  p.add_argument("--distill", action="store_true",
                 help="also the GPTQ rows distilled as the main job's --distill does (their "
                      "scales, biases and LayerNorm; about 280 s a row)")
  p.add_argument("--distill-steps", type=int, default=100,
                 help="optimizer steps per block (the main job's default, 100)")
  p.add_argument("--layers", type=int, default=None,
                 help="only the first layers (quick runs; the checkpoints must match)")
  args = p.parse_args(argv)
  checkpoints = []
  for item in args.checkpoint:
    label, sep, path = item.partition("=")
    if not sep or not label or not os.path.exists(path):
      p.error(f"--checkpoint must be LABEL=PATH of an existing file, got {item!r}")
    checkpoints.append((label, path))
  if not (args.bits > 0 and round(args.bits) >= 2):
    p.error(f"--bits must be >= 2 (the narrowest RTN/GPTQ code), got {args.bits:g}")
  t_start = time.perf_counter()
  model_dir = bert.minilm_dir()
  model = bert.load_safetensors(model_dir, num_layers=args.layers)
  tok = bert.load_tokenizer(model_dir)
  params = nnx.state(model, nnx.Param)
  b = args.bits
  ib = int(round(b))
  # The matrices the job compresses (the 2 × 384 token-type table stays dense).
  plain = flat_paths(sc.decompose_leafwise(params, key=jax.random.key(args.seed),
                                           bits_per_weight=b, outliers="auto", progress=False))
  flat_params = flat_paths(params)
  weights = {k: flat_params[k] for k, v in plain.items() if sc.is_compressed(v)}
  cal = bert.calibrate_texts(model, tok, CALIBRATION)
  kernels = sorted(cal.hessians)
  if set(kernels) | set(TABLES) != set(weights):
    raise SystemExit(f"expected the {len(kernels)} kernels and the 2 tables, got {sorted(weights)}")
  evaluate = Evaluator(model_dir, tok, args.layers)
  rows = []

  def row(label, flat, note=""):
    r = evaluate(flat)
    _row(label, flat, note, r)

  def distilled_row(label, flat, note=""):
    """``flat`` distilled as the main job's ``--distill`` does it (same texts, steps, rate)."""
    student = evaluate.student(flat)
    t0 = time.perf_counter()
    bert.distill_blocks(student, bert.load_safetensors(model_dir, num_layers=args.layers), tok,
                        CALIBRATION, steps=args.distill_steps, lr=2e-3, dev_texts=DEVELOPMENT,
                        key=jax.random.key(args.seed))
    _row(label, flat, note + f" (distilled in {time.perf_counter() - t0:.0f} s)",
         evaluate.of_model(student))

  def _row(label, flat, note, r):
    r.update(label=label, bits=stored_bits(flat, weights), note=note)
    rows.append(r)
    print(f"{b:g} bits | {label:<44} | {r['bits']:.3f} b/w | cosine {r['mean']:.5f} / "
          f"{r['min']:.5f} | top-1 {r['top1']}/20 | dev {r['dev_mean']:.5f} {note}", flush=True)

  tables = {t: plain[t] for t in TABLES}
  row("plain cuts", {p: plain[p] for p in weights})
  rtn = {k: sc.Transposed(inner=sc.rtn(np.asarray(weights[k]).T, bits=ib)) for k in kernels}
  row(f"RTN int{ib} per output channel", {**rtn, **tables})
  gq = {k: gptq.gptq(weights[k], cal.hessians[k], bits=ib) for k in kernels}
  row(f"GPTQ int{ib} per output channel", {**gq, **tables})
  if args.distill:
    distilled_row(f"GPTQ int{ib} per output channel + distillation", {**gq, **tables})
  splits = {}   # (kernel bits, table values) -> the label whose GPTQ-at-split row has them
  for label, path in checkpoints:
    flat, meta = load_factors(path)
    missing = [k for k in weights if not sc.is_compressed(flat.get(k))]
    if missing:
      raise SystemExit(f"{path}: matrices not compressed: {missing}")
    row(label, flat, note=f"({meta['budget']})" if meta.get("budget") else "")
    per = {k: kernel_bits(flat[k], weights[k]) for k in weights}
    if max(per.values()) - min(per.values()) > 0.25:   # an allocated checkpoint
      kernel_ints = split_bits(per, weights, kernels, flat, budget=b)
      same = (tuple(sorted(kernel_ints.items())),
              tuple(np.asarray(flat[t].reconstruct(np.float32)).tobytes() for t in TABLES))
      if same in splits:   # e.g. a distilled copy of an allocated checkpoint: its tables as they were
        print(f"GPTQ at the split of '{label}': the row of '{splits[same]}'", flush=True)
        continue
      splits[same] = label
      split = {k: gptq.gptq(weights[k], cal.hessians[k], bits=kernel_ints[k]) for k in kernels}
      table_bits = ", ".join(f"{t.split('/')[1]} {per[t]:.2f}" for t in TABLES)
      note = (f"(kernels int{min(q.inner.bits for q in split.values())}-"
              f"{max(q.inner.bits for q in split.values())}; tables: {table_bits} b/w)")
      row(f"GPTQ at the split of '{label}'", {**split, **{t: flat[t] for t in TABLES}}, note)
      if args.distill:
        distilled_row(f"GPTQ at the split of '{label}' + distillation",
                      {**split, **{t: flat[t] for t in TABLES}}, note)
  print(f"total {time.perf_counter() - t_start:.0f} s")
  if args.out:
    with open(args.out, "a", encoding="utf-8") as fh:
      for r in rows:
        fh.write(f"| {b:g} | {r['label']} {r['note']} | {r['bits']:.2f} | {r['mean']:.4f} | "
                 f"{r['min']:.4f} | {r['top1']}/20 | {r['dev_mean']:.4f} |\n")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
