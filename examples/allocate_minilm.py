"""Global bit allocation over MiniLM's 36 Linear kernels, with measured sensitivities.

The allocation (``jax_signedcut._calibration.allocate``) minimises
``Σ_l sens_l · err_l(k_l)`` within one byte budget. Here:

* ``err_l(b)``: the squared relative output error under the calibration H of the
  part kernel ``l`` actually keeps at ``b`` bits per weight — the calibrated
  cuts (``search="diag"``, the per-kind sparse shares of the main job) or the
  plain cuts, whichever is lower (the main job's fallback), at 3, 4 and 5 bits.
* ``sens_l``: measured. Only kernel ``l`` is replaced by its 4-bit part and the
  loss ``mean(1 − cos)`` of the sentence embeddings to the original model's on
  64 calibration texts is divided by ``err_l(4)``: the model's loss per unit of
  this kernel's output error.

Then three arms at the same 4 bits per weight on average: uniform, allocated
with ``sens = 1`` (the first trial's choice) and allocated with the measured
sensitivities; cosine on the ``DEVELOPMENT`` texts (for choosing) and on the
evaluation sentences (held out, reported only). The embedding tables stay
dense in every arm (the comparison is about the kernels). Only the calibration
texts choose anything; nothing is downloaded.

    python examples/allocate_minilm.py        # ~7 min on a loaded 2-core machine
"""

from __future__ import annotations

import collections
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_signedcut as sc
from jax_signedcut._calibration import allocate, cuts, objective
from jax_signedcut.models import bert
from jax_signedcut.models.calibration_texts import CALIBRATION, DEVELOPMENT
from jax_signedcut.models.eval_texts import SENTENCES

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compress_minilm import SPARSE_BY_KIND, flat_paths  # noqa: E402

BUDGETS = (3.0, 4.0, 5.0)
TARGET = 4.0


def _sparse_for(path):
  return next((f for pattern, f in SPARSE_BY_KIND if re.search(pattern, path)), 0.0)


def kept_parts(params, cal, key):
  """``{(path, bits): dense kept part}`` and ``{(path, bits): squared rel. output error}``."""
  opts = cuts.CutOptions(search="diag")
  kept, err2 = {}, {}
  for path in sorted(cal.hessians):
    w = jnp.asarray(params[path], jnp.float32)
    h = jnp.asarray(cal.hessians[path])
    m, n = w.shape
    sf = _sparse_for(path)
    width = int((max(BUDGETS) * m * n / 8 - 4 * m - 8 * int(sf * m * n))
                // sc.bytes_per_cut(m, n))
    part, _ = cuts.calibrated_cuts(w, h, key=key, width=width, options=opts, with_gains=False)
    system = cuts.gram(part, w, h, opts)     # prefixes: one system for every budget
    for b in BUDGETS:
      ours = cuts.fit_budget(part, w, h, bits_per_weight=b, sparse_fraction=sf, options=opts,
                             system=system).reconstruct()
      plain = sc.decompose(w, key=key, bits_per_weight=b).reconstruct()
      e_ours, e_plain = (float(objective.relative_output_error(w, r, h)) for r in (ours, plain))
      kept[path, b] = np.asarray(ours if e_ours <= e_plain else plain)
      err2[path, b] = min(e_ours, e_plain) ** 2
  return kept, err2


def main(argv=None) -> dict:
  del argv
  t0 = time.perf_counter()
  model_dir = bert.minilm_dir()
  tok = bert.load_tokenizer(model_dir)
  model = bert.load_safetensors(model_dir)
  params = flat_paths(nnx.state(model, nnx.Param))
  cal = bert.calibrate_texts(model, tok, CALIBRATION)
  kept, err2 = kept_parts(params, cal, jax.random.key(0))
  paths = sorted(cal.hessians)
  shapes = {p: np.shape(params[p]) for p in paths}

  def embed(replaced, texts):
    m = bert.load_safetensors(model_dir)
    for p, v in replaced.items():
      keys = tuple(int(k) if k.isdigit() else k for k in p.split("/"))
      bert._variable(m, keys).set_value(jnp.asarray(v))   # noqa: SLF001
    return bert.encode(m, tok, texts)

  def cosine(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

  probe = list(CALIBRATION[::5])[:64]
  ref = embed({}, probe)
  sens = {p: float(np.mean(1 - cosine(ref, embed({p: kept[p, TARGET]}, probe))))
          / err2[p, TARGET] for p in paths}
  nbytes = {(p, b): b * np.prod(shapes[p]) / 8 for p in paths for b in BUDGETS}
  curves = {p: (np.array([nbytes[p, b] for b in BUDGETS]),
                np.array([err2[p, b] for b in BUDGETS])) for p in paths}
  total = sum(nbytes[p, TARGET] for p in paths)
  refs = {"development": embed({}, DEVELOPMENT), "evaluation": embed({}, SENTENCES)}
  texts = {"development": DEVELOPMENT, "evaluation": SENTENCES}
  report = {"sensitivity": sens}
  for arm, weights in (("uniform", None), ("allocated, sens = 1", {p: 1.0 for p in paths}),
                       ("allocated, measured sens", sens)):
    if weights is None:
      bits = {p: TARGET for p in paths}
    else:
      bits = {p: BUDGETS[i] for p, i in allocate.allocate(curves, total,
                                                          sensitivity=weights).items()}
    row = {"bits_per_weight": sum(nbytes[p, b] for p, b in bits.items()) / total * TARGET,
           "predicted_loss": sum(sens[p] * err2[p, b] for p, b in bits.items()),
           "allocation": collections.Counter(f"{re.sub(r'layers/[0-9]+/', '', p)}@{b:g}"
                                             for p, b in bits.items())}
    for name, t in texts.items():
      c = cosine(refs[name], embed({p: kept[p, b] for p, b in bits.items()}, t))
      row[name] = (float(c.mean()), float(c.min()))
    report[arm] = row
    print(f"{arm:<26} {row['bits_per_weight']:.3f} bits/weight, predicted loss "
          f"{row['predicted_loss']:.4f}; cosine development {row['development'][0]:.4f} "
          f"(min {row['development'][1]:.4f}), evaluation {row['evaluation'][0]:.4f} "
          f"(min {row['evaluation'][1]:.4f})")
    if weights is not None:
      print("   ", dict(sorted(row["allocation"].items())))
  print(f"time {time.perf_counter() - t0:.0f} s")
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
