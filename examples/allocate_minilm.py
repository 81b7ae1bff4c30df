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
texts choose anything; nothing is downloaded. The steps are the library's
(``allocate.budget_curves``, ``bert.sensitivities``, ``allocate.allocate_bits``),
as in the main job's ``examples/compress_minilm.py --calibrate --allocate``, which
compresses with the allocation (``allocate.allocation_rules``) instead of comparing arms.

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

from jax_signedcut._calibration import allocate
from jax_signedcut._core.tree import leaf_key
from jax_signedcut.models import bert
from jax_signedcut.models.calibration_texts import CALIBRATION, DEVELOPMENT
from jax_signedcut.models.eval_texts import SENTENCES

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compress_minilm import _sparse_for, flat_paths  # noqa: E402

BUDGETS = (3.0, 4.0, 5.0)
TARGET = 4.0


def main(argv=None) -> dict:
  del argv
  t0 = time.perf_counter()
  model_dir = bert.minilm_dir()
  tok = bert.load_tokenizer(model_dir)
  model = bert.load_safetensors(model_dir)
  params = flat_paths(nnx.state(model, nnx.Param))
  cal = bert.calibrate_texts(model, tok, CALIBRATION)
  paths = sorted(cal.hessians)
  key = jax.random.key(0)
  curves, kept = allocate.budget_curves(
      {p: params[p] for p in paths}, cal.hessians, key=lambda p: leaf_key(key, p),
      budgets=BUDGETS, options=lambda p: {"sparse_fraction": _sparse_for(p), "search": "diag"},
      keep=BUDGETS)
  err2 = {(p, b): float(e) for p in paths for b, e in zip(*curves[p])}
  shapes = {p: np.shape(params[p]) for p in paths}
  sizes = {p: int(np.prod(shapes[p])) for p in paths}

  def embed(replaced, texts):
    m = bert.load_safetensors(model_dir)
    for p, v in replaced.items():
      allocate._variable(m, p).set_value(jnp.asarray(v))   # noqa: SLF001
    return bert.encode(m, tok, texts)

  def cosine(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

  probe = list(CALIBRATION[::5])[:64]
  sens = bert.sensitivities(model, tok, probe, {p: kept[p, TARGET] for p in paths},
                            {p: err2[p, TARGET] for p in paths})
  total = sum(TARGET * sizes[p] / 8 for p in paths)
  refs = {"development": embed({}, DEVELOPMENT), "evaluation": embed({}, SENTENCES)}
  texts = {"development": DEVELOPMENT, "evaluation": SENTENCES}
  report = {"sensitivity": sens}
  for arm, weights in (("uniform", None), ("allocated, sens = 1", {p: 1.0 for p in paths}),
                       ("allocated, measured sens", sens)):
    if weights is None:
      bits = {p: TARGET for p in paths}
    else:
      bits = allocate.allocate_bits(curves, sizes, TARGET, sensitivity=weights)
    row = {"bits_per_weight": sum(b * sizes[p] / 8 for p, b in bits.items()) / total * TARGET,
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
