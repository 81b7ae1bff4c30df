"""Calibrated compression of all-MiniLM-L6-v2, against plain cuts, RTN and GPTQ at equal bits.

Calibration and evaluation are kept apart: the layers' input statistics H come
from ``jax_signedcut.models.calibration_texts.CALIBRATION`` (and the layer
sensitivities for the allocation from the same texts); the figures are
measured on ``jax_signedcut.models.eval_texts`` only (50 sentences: embedding
cosine to the original model, mean and worst; 20 queries × 30 passages:
top-1 agreement with the original model's nearest passage).

Every row compresses the 36 Linear kernels with its method and the word and
position embedding tables with plain signed cuts at the same bits per weight
(identical in every row; a lookup table has no input statistics), so rows
differ only in how the kernels are compressed:

* plain cuts: ``sc.decompose`` (outliers "auto"), the uncalibrated baseline;
* RTN: per-output-channel int-b absmax rounding (``sc.rtn`` on the torch layout);
* GPTQ: per-output-channel int-b, calibrated on the same H;
* calibrated cuts: input scales + H-aware cuts + sparse part by output impact
  + least-squares refit, every kernel at the budget;
* + allocation: the same, with each kernel's width chosen by
  :func:`jax_signedcut._calibration.allocate.allocate` from its error curve and
  measured sensitivity, under the same total kernel bytes.

Usage::

  python examples/calibrate_minilm.py --bits 8,4,3,2 --cache /tmp/calib_cache

The cache directory keeps the statistics and the H-aware cuts (made once, at
the largest budget; lower budgets are their prefixes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_signedcut as sc
from jax_signedcut._calibration import allocate, cuts, gptq, objective, stats
from jax_signedcut._calibration.parts import InputScaled
from jax_signedcut.models import bert
from jax_signedcut.models.calibration_texts import CALIBRATION
from jax_signedcut.models.eval_texts import ANSWERS, DOCUMENTS, QUERIES, SENTENCES

EMBEDDINGS = ("embeddings/word/embedding", "embeddings/position/embedding")
# Sparse share per kernel kind, chosen on layers 0–2 by output error on the calibration and
# development statistics (never the evaluation texts): the FFN output kernels' inputs (after
# GELU) have a few dominant channels that the cuts miss; for q/k/v the entries cost more
# than the cuts they displace.
SPARSE_BY_KIND = (("/output/", 0.005), ("/attention_out/", 0.002), ("/intermediate/", 0.002),
                  ("", 0.0))


def _var(model, path):
  obj = model
  for k in path.split("/"):
    obj = obj[int(k)] if k.isdigit() else getattr(obj, k)
  return obj


def _cosine(a, b):
  return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class Evaluator:
  """Embedding cosine and retrieval agreement of a model with replaced matrices."""

  def __init__(self, model_dir, tok):
    self.model_dir, self.tok = model_dir, tok
    base = bert.load_safetensors(model_dir)
    self.e0 = bert.encode(base, tok, SENTENCES)
    self.r0 = self._retrieval(base)

  def _retrieval(self, model):
    q = bert.encode(model, self.tok, QUERIES)
    d = bert.encode(model, self.tok, DOCUMENTS)
    return np.argmax(q @ d.T, axis=1)

  def __call__(self, dense: dict) -> dict:
    model = bert.load_safetensors(self.model_dir)
    for path, a in dense.items():
      _var(model, path).set_value(jnp.asarray(a, jnp.float32))
    cos = _cosine(self.e0, bert.encode(model, self.tok, SENTENCES))
    r = self._retrieval(model)
    return dict(cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                top1_agree=int(np.sum(r == self.r0)), top1_right=int(np.sum(r == np.array(ANSWERS))))


def _load_part(fn, shape):
  z = np.load(fn)
  inner = sc.SignedCut(s_bits=jnp.asarray(z["s_bits"]), t_bits=jnp.asarray(z["t_bits"]),
                       c=jnp.asarray(z["c"]), num_cuts=jnp.int32(len(z["c"])), shape=shape)
  return InputScaled(scale=jnp.asarray(z["scale"]), inner=inner), np.asarray(z["gains"])


class Choice:
  """A calibrated part or the plain ``SignedCut`` it lost to, behind one interface."""

  def __init__(self, part):
    self.part = part
    self.plain = isinstance(part, sc.SignedCut)

  def reconstruct(self):
    return sc.reconstruct(self.part) if self.plain else self.part.reconstruct()

  @property
  def nbytes(self):
    return sc.nbytes(self.part) if self.plain else self.part.nbytes


class StageCuts:
  """H-aware cuts of every kernel at ``top_bits``, made once and cached per kernel (``.npz``).

  With ``wait``, a kernel whose file another process is still writing is waited for
  instead of being made again.
  """

  def __init__(self, model, cal, cache, top_bits, say, wait=False):
    self.model, self.cal, self.cache, self.top_bits, self.say = model, cal, cache, top_bits, say
    self.wait = wait
    self.parts, self.gains = {}, {}

  def file(self, path):
    return os.path.join(self.cache, path.replace("/", ".") + ".npz")

  def ready(self, path):
    return path in self.parts or os.path.exists(self.file(path))

  def __getitem__(self, path):
    if path not in self.parts:
      w = jnp.asarray(_var(self.model, path)[...])
      m, n = w.shape
      fn = self.file(path)
      while self.wait and not os.path.exists(fn):
        time.sleep(5)
      if not os.path.exists(fn):
        t0 = time.perf_counter()
        width = sc.width_for_bits(m, n, self.top_bits)
        part, g = cuts.calibrated_cuts(w, self.cal.hessians[path], width=width,
                                       key=jax.random.fold_in(jax.random.key(0),
                                                              zlib.crc32(path.encode())))
        f = part.inner
        np.savez(fn, scale=np.asarray(part.scale), s_bits=np.asarray(f.s_bits),
                 t_bits=np.asarray(f.t_bits), c=np.asarray(f.c), gains=np.asarray(g))
        self.say(f"  cuts {path}: {width} in {time.perf_counter() - t0:.1f} s")
      else:
        time.sleep(1)   # a file that just appeared may still be being written
      self.parts[path], self.gains[path] = _load_part(fn, (m, n))
    return self.parts[path]


def sensitivities(model_dir, tok, model, cal, fits, texts):
  """Loss (1 − cos on ``texts``) per unit relative output error², one kernel replaced at a time."""
  base = bert.load_safetensors(model_dir)
  e0 = bert.encode(base, tok, texts)
  sens = {}
  for path, p in fits.items():
    w = jnp.asarray(_var(model, path)[...])
    a = p.reconstruct()
    rel2 = float(objective.relative_output_error(w, a, cal.hessians[path])) ** 2
    old = _var(base, path)[...]
    _var(base, path).set_value(a)
    loss = float(np.mean(1 - _cosine(e0, bert.encode(base, tok, texts))))
    _var(base, path).set_value(old)
    sens[path] = loss / max(rel2, 1e-12)
  return sens


def allocation(parts, gains, model, cal, bits, sens, sparse_for, step=8, low_bits=1.0):
  """Bytes per kernel from the greedy error curves, the sensitivities and one total budget."""
  curves, budget = {}, 0.0
  for path, part in parts.items():
    w = jnp.asarray(_var(model, path)[...])
    m, n = w.shape
    err = cuts.error_curve(gains[path], w, cal.hessians[path], part)
    err = err / err[0]
    fixed = 4 * m + 8 * int(sparse_for(path) * m * n)
    k0 = max(1, int((low_bits * m * n / 8 - fixed) // sc.bytes_per_cut(m, n)))
    ks = np.arange(k0, len(err), step)
    curves[path] = (fixed + ks * sc.bytes_per_cut(m, n), err[ks])
    budget += bits * m * n / 8
  choice = allocate.allocate(curves, budget, sensitivity=sens)
  return {p: float(curves[p][0][i]) * 8 / np.prod(_var(model, p)[...].shape)
          for p, i in choice.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--bits", default="8,4,3,2")
  p.add_argument("--cache", default="calibrate_minilm_cache")
  p.add_argument("--sparse", type=float, default=None,
                 help="sparse fraction of every calibrated kernel (default: per kind, "
                 "SPARSE_BY_KIND)")
  p.add_argument("--methods",
                 default="plain,rtn,gptq,gptq+bc,calibrated,calibrated+bc,allocated+bc",
                 help="'+bc': the mean output shift of each kernel folded into its bias")
  p.add_argument("--out", default=None, help="write the results as JSON")
  p.add_argument("--top-bits", type=float, default=None,
                 help="budget of the cached cuts (default: the largest of --bits)")
  p.add_argument("--wait", action="store_true",
                 help="wait for cut files another process is writing into --cache")
  args = p.parse_args(argv)
  budgets = [float(b) for b in args.bits.split(",")]
  methods = args.methods.split(",")
  say = print
  os.makedirs(args.cache, exist_ok=True)
  t_start = time.perf_counter()
  model_dir = bert.minilm_dir()
  model = bert.load_safetensors(model_dir)
  tok = bert.load_tokenizer(model_dir)

  calf = os.path.join(args.cache, "calibration.safetensors")
  if not os.path.exists(calf):
    t0 = time.perf_counter()
    stats.save_calibration(calf, bert.calibrate_texts(model, tok, CALIBRATION))
    say(f"statistics of {len(CALIBRATION)} calibration texts: {time.perf_counter() - t0:.1f} s")
  cal = stats.load_calibration(calf)
  means_fn = os.path.join(args.cache, "means.npz")
  if not os.path.exists(means_fn):   # the file format carries H only; bias correction needs means
    np.savez(means_fn, **{k.replace("/", "."): v for k, v in
                          bert.calibrate_texts(model, tok, CALIBRATION).means.items()})
  means = {k.replace(".", "/"): v for k, v in np.load(means_fn).items()}
  say(f"calibration: {cal.tokens} tokens, {len(cal.hessians)} kernels")
  kernels = sorted(cal.hessians)
  weights = {path: jnp.asarray(_var(model, path)[...]) for path in kernels + list(EMBEDDINGS)}

  parts = StageCuts(model, cal, args.cache, args.top_bits or max(budgets), say, wait=args.wait)

  plain_fn = os.path.join(args.cache, "plain.safetensors")
  if not os.path.exists(plain_fn):
    flat = {path: sc.decompose(weights[path], key=jax.random.fold_in(
        jax.random.key(0), zlib.crc32(path.encode())), bits_per_weight=max(budgets))
            for path in kernels + list(EMBEDDINGS)}
    sc.save(plain_fn, flat)
  plain = sc.load(plain_fn)

  def sparse_for(path):
    if args.sparse is not None:
      return args.sparse
    return next(f for pattern, f in SPARSE_BY_KIND if pattern in path)

  cache, systems = {}, {}

  def system(path):
    if path not in systems:   # one Gram per kernel: every budget's refit slices it
      systems[path] = cuts.gram(parts[path], weights[path], cal.hessians[path])
    return systems[path]

  def fitted(bits, per):
    """Calibrated parts of every kernel at ``bits`` (or the per-kernel bits ``per``), memoised."""
    key = (bits, None if per is None else tuple(sorted(per.items())))
    if key not in cache:
      order = sorted(kernels, key=lambda p: not parts.ready(p))   # ready kernels first
      cache[key] = {}
      for path in order:
        b = bits if per is None else per[path]
        ours = cuts.fit_budget(parts[path], weights[path], cal.hessians[path], bits_per_weight=b,
                               sparse_fraction=sparse_for(path), system=system(path))
        # The H-aware cuts can lose to plain cuts (with their magnitude outliers) under the
        # very H they were fit to (the FFN output kernels): keep whichever is better there.
        theirs = sc.truncate(plain[path], bits_per_weight=b)
        e_ours = objective.output_error(weights[path], ours.reconstruct(), cal.hessians[path])
        e_theirs = objective.output_error(weights[path], sc.reconstruct(theirs),
                                          cal.hessians[path])
        cache[key][path] = Choice(ours) if float(e_ours) <= float(e_theirs) else Choice(theirs)
    return cache[key]

  evaluate = Evaluator(model_dir, tok)
  results = []
  sens = None
  for bits in budgets:
    emb = {path: sc.reconstruct(sc.truncate(plain[path], bits_per_weight=bits))
           for path in EMBEDDINGS}
    for method in methods:
      t0 = time.perf_counter()
      dense, nbytes, per = dict(emb), 0, None
      if method == "plain":
        for path in kernels:
          f = sc.truncate(plain[path], bits_per_weight=bits)
          dense[path], nbytes = sc.reconstruct(f), nbytes + sc.nbytes(f)
      elif method in ("rtn", "gptq", "gptq+bc"):
        b = int(round(bits))
        for path in kernels:
          w = weights[path]
          if method == "rtn":
            q = sc.rtn(w.T, bits=b)
            dense[path], nbytes = sc.dequantize_matrix(q).T, nbytes + q.nbytes
          else:
            q = gptq.gptq(w, cal.hessians[path], bits=b)
            dense[path], nbytes = q.reconstruct(), nbytes + q.nbytes
      else:
        if method.startswith("allocated"):
          if sens is None:
            low = min(budgets)
            sens = sensitivities(model_dir, tok, model, cal, fitted(low, None), CALIBRATION[:64])
          per = allocation(parts.parts, parts.gains, model, cal, bits, sens, sparse_for)
          chosen = fitted(bits, per)
        else:
          per = None
          chosen = fitted(bits, None)
        for path in kernels:
          dense[path], nbytes = chosen[path].reconstruct(), nbytes + chosen[path].nbytes
        plain_kept = sorted(p for p in kernels if chosen[p].plain)
      if method.endswith("+bc"):      # the mean output shift goes into the (dense) bias
        for path in kernels:
          bias = path[:-len("kernel")] + "bias"
          dense[bias] = jnp.asarray(_var(model, bias)[...]) + stats.bias_correction(
              means[path], weights[path], dense[path])
      r = evaluate(dense)
      total = sum(np.prod(weights[p].shape) for p in kernels)
      r.update(bits=bits, method=method, kernel_bits=8 * nbytes / total,
               seconds=time.perf_counter() - t0)
      if method.startswith(("calibrated", "allocated")):
        r["plain_kept"] = plain_kept
      if per is not None:
        r["allocation"] = {p: round(v, 2) for p, v in per.items()}
      results.append(r)
      if "plain_kept" in r:
        say(f"  plain cuts kept for {len(r['plain_kept'])} kernels: {r['plain_kept']}")
      say(f"{bits:g} bits  {method:10s} kernels {r['kernel_bits']:.2f} b/w  cos mean "
          f"{r['cos_mean']:.4f} min {r['cos_min']:.4f}  top-1 agree {r['top1_agree']}/20 "
          f"({r['seconds']:.0f} s)", flush=True)
  say(f"total {time.perf_counter() - t_start:.0f} s")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as fh:
      json.dump(dict(results=results, sensitivity=sens, tokens=cal.tokens), fh, indent=1)
  return results


if __name__ == "__main__":
  main()
