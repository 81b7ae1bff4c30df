"""``jax-signedcut compress``: a dense checkpoint in, one leaf at a time, a compressed file out."""

from __future__ import annotations

import os
import sys
import warnings

from jax_signedcut._cli import interrupts as _interrupts
from jax_signedcut._cli import measure as _measure
from jax_signedcut._cli import table as _table
from jax_signedcut._cli.args import CliError, check_method_args, default_budget


def progress(total, desc, quiet):
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(total=total, desc=desc, unit="leaf", disable=True if quiet else None,
              file=sys.stderr, leave=False)


def release_memory() -> None:
  """Hands freed heap pages back to the OS between matrices (glibc only).

  Without it glibc keeps the freed buffers of one matrix around and the next
  matrix's land next to them, so the peak creeps up over the first few.
  """
  try:
    import ctypes  # noqa: PLC0415
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def oversized(b) -> str | None:
  """``"rate 2"`` / ``"bits 24"`` when a budget pays for more than bf16 storage, else None."""
  if b is None:
    return None
  if b.rate is not None and b.rate > 1:
    return f"rate {b.rate:g}"
  if b.bits_per_weight is not None and b.bits_per_weight > 16:
    return f"bits {b.bits_per_weight:g}"
  return None


def warn_oversized(default, rules) -> None:
  """Warns (stderr) about each budget that pays for more than bf16 storage."""
  for what, b in [("default budget", default), *((f"rule {r!r}", b) for r, b in rules)]:
    big = oversized(b)
    if big:
      print(f"jax-signedcut: warning: {what}: {big} is more than a bf16 copy of the matrices "
            "takes (rate 1 = bits 16 = the bf16 size), so the output is larger than a bf16 "
            "checkpoint", file=sys.stderr)


def _budget_dict(b) -> dict | None:
  if b is None:
    return None
  d = {k: v for k, v in b._asdict().items() if v is not None}
  if "options" in d:
    d["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["options"]}
  return d


def _compress_leaf(x, *, key, job, args, method, options, path, stats=None):
  """One leaf's compressed value (the signed cut path keeps its lean leaf-by-leaf variant)."""
  from jax_signedcut._signedcut import decompose as _decompose  # noqa: PLC0415

  # --- calibration (issue 14): a leaf with statistics in --calibration ---------------------
  if stats is not None:
    from jax_signedcut._calibration import api as _cal_api  # noqa: PLC0415
    h, layout = stats
    outliers = args.outliers if job.outliers is None else job.outliers
    f = _cal_api.compress_one(
        x, h, key=key, width=job.width, rate=job.rate, bits_per_weight=job.bits_per_weight,
        max_error=job.max_error, outliers=outliers, lowrank=job.lowrank or args.lowrank,
        method=method, options=options or None, layout=layout)
    return f, {"calibrated": True}
  # --- end calibration ----------------------------------------------------------------------
  if method == "signed_cut":
    outliers = args.outliers if job.outliers is None else job.outliers
    lowrank = args.lowrank if job.lowrank is None else job.lowrank
    # x is ours: the outliers are zeroed in its buffer (no remainder copy);
    # with a low-rank part it is kept to measure the error exactly.
    f = _decompose._decompose_leaf(  # noqa: SLF001
        x, key=key, width=job.width, rate=job.rate, bits_per_weight=job.bits_per_weight,
        max_error=job.max_error, outliers=outliers, backend=args.backend, donate=not lowrank,
        progress_desc=None if args.quiet else path, lowrank=lowrank)
    return f, {"outliers": outliers, **({"lowrank": lowrank} if lowrank else {})}
  f = _decompose.decompose(x, key=key, rate=job.rate, bits_per_weight=job.bits_per_weight,
                           method=method, options=options or None)
  return f, {}


def _load_calibration(args, paths) -> dict:
  """``--calibration FILE`` matched to the checkpoint's leaves: ``{path: (h, layout)}``."""
  if not args.calibration:
    return {}
  from jax_signedcut._calibration import api as _cal_api  # noqa: PLC0415
  from jax_signedcut._calibration import stats as _stats  # noqa: PLC0415
  try:
    return _cal_api.match(_stats.load_calibration(args.calibration), paths).by_path
  except ValueError as e:
    raise CliError(f"--calibration {args.calibration}: {e}") from None


def _allocate_jobs(src, args, jobs, key, arg_options) -> tuple[dict, dict]:
  """``--allocate``: the signed cut jobs of the leaves with sensitivities at their allocated bits.

  The leaves with statistics by their output error under H, those the file's
  ``weight_sensitivities`` name (embedding tables) by their plain cuts' weight error.
  Returns ``(jobs, {path: bits})``. Reads each such leaf once more (one at a time) for its
  error curve.
  """
  import numpy as np  # noqa: PLC0415

  from jax_signedcut._calibration import allocate as _alloc  # noqa: PLC0415
  from jax_signedcut._calibration import stats as _stats  # noqa: PLC0415
  from jax_signedcut._core import tree as _tree  # noqa: PLC0415

  where = f"--allocate: --calibration {args.calibration}"
  try:
    cal = _stats.load_calibration(args.calibration)
  except ValueError as e:
    raise CliError(f"--calibration {args.calibration}: {e}") from None
  if cal.sensitivities is None:
    raise CliError(f"{where} has no sensitivities (the metadata field 'sensitivities', "
                   "{weight name: loss per unit of squared relative output error}, written by "
                   "save_calibration(..., sensitivities=...); see docs/calibration.md)")
  wsens = dict(cal.weight_sensitivities or {})
  unknown = sorted(set(wsens) - {path for _, path, _, _ in src.entries})
  if unknown:
    raise CliError(f"{where}: metadata 'weight_sensitivities' names {len(unknown)} weights "
                   f"{args.input} does not have: {unknown[:4]}")
  picked, sizes, bits = [], {}, {}
  for i, (_, path, shape, _) in enumerate(src.entries):
    job = jobs.get(path)
    if (job is None or (path not in cal.hessians and path not in wsens)
        or (job.method or args.method) != "signed_cut"):
      continue
    if job.width is not None or job.max_error is not None or len(shape) != 2:
      raise CliError(f"{where}: leaf {path!r} of shape {tuple(shape)} needs a rate or bits "
                     "budget (no width / max_error) and a 2-D shape to be allocated")
    picked.append((i, path))
    sizes[path] = int(np.prod(shape))
    bits[path] = job.bits_per_weight if job.bits_per_weight is not None else 16 * job.rate
  if not picked:
    raise CliError(f"{where}: no signed cut leaf of {args.input} has statistics")
  target = sum(bits[p] * sizes[p] for p in sizes) / sum(sizes.values())
  curves, gptq = {}, {}
  try:
    budgets = _alloc.budget_grid(target)
    codes = _alloc.gptq_codes(budgets) if getattr(args, "allocate_gptq", False) else ()
    for i, path in picked:
      job = jobs[path]
      w = np.asarray(src.get(i), np.float32)
      options = dict(job.options or ()) if job.method is not None or job.options else arg_options
      outliers = args.outliers if job.outliers is None else job.outliers
      if path in cal.hessians:
        w = w.T if cal.layout == "torch" else w
        curves.update(_alloc.budget_curves(
            {path: w}, {path: cal.hessians[path]}, key=_tree.leaf_key(key, path),
            budgets=budgets, options=options, outliers=outliers)[0])
        if getattr(args, "allocate_gptq", False):
          gptq.update(_alloc.gptq_curves({path: w}, {path: cal.hessians[path]},
                                         codes=codes)[0])
      else:   # no statistics: the plain cuts of the leaf as stored (what compressing it makes)
        curves.update(_alloc.plain_curves({path: w}, key=_tree.leaf_key(key, path),
                                          budgets=budgets, outliers=outliers)[0])
      del w
      release_memory()
    methods = {}
    if gptq:   # the method chosen per kernel with its bits (docs/calibration.md section 13)
      curves, methods = _alloc.merge_curves({"signed_cut": curves, "gptq": gptq})
    alloc = _alloc.allocate_bits(
        curves, sizes, target,
        sensitivity={p: cal.sensitivities[p] if p in cal.hessians else wsens[p] for p in sizes})
  except ValueError as e:
    raise CliError(f"{where}: {e}") from None
  chosen = {p: methods.get(p, {}).get(alloc[p], "signed_cut") for p in alloc}
  if not args.quiet:
    mean = sum(alloc[p] * sizes[p] for p in sizes) / sum(sizes.values())
    print(f"allocation: {mean:.4g} bits/weight over {len(sizes)} leaves (budget {target:.4g})")
    for p in sorted(alloc):
      print(f"  {p}  {alloc[p]:g} bits" + ("  gptq" if chosen[p] == "gptq" else ""))
  new = dict(jobs)
  for p, b in alloc.items():
    if chosen[p] == "gptq":
      new[p] = jobs[p]._replace(rate=None, bits_per_weight=b, method="gptq", options={},
                                outliers=None, lowrank=None)
    else:
      new[p] = jobs[p]._replace(rate=None, bits_per_weight=b)
  return new, {p: b if chosen[p] == "signed_cut" else {"bits": b, "method": "gptq"}
               for p, b in alloc.items()}


def run(args) -> int:
  import jax  # noqa: PLC0415

  from jax_signedcut._checkpoint import format as _format  # noqa: PLC0415
  from jax_signedcut._checkpoint import writer as _writer  # noqa: PLC0415
  from jax_signedcut._cli import sources as _sources  # noqa: PLC0415

  check_method_args(args)
  if getattr(args, "allocate", False) and not args.calibration:
    raise CliError("--allocate needs --calibration STATS (with sensitivities)")
  if getattr(args, "allocate_gptq", False) and not getattr(args, "allocate", False):
    raise CliError("--allocate-gptq needs --allocate")
  default = default_budget(args)
  rules = list(args.rule or [])
  if default is None and not any(b is not None for _, b in rules):
    raise CliError("no budget: give --rate, --bits, --width or --max-error (or a --rule with a "
                   "budget)")
  warn_oversized(default, rules)
  arg_options = dict(args.option or [])
  key = jax.random.key(args.seed)
  with _sources.open_source(args.input) as src, _writer.Writer(args.output) as writer:
    plan, caught = plan_leaves(src, args, rules, default)
    for w in caught:
      print(f"jax-signedcut: warning: {w.message}", file=sys.stderr)
    jobs = dict(zip(plan.paths, plan.jobs))
    calibration = _load_calibration(args, plan.paths)   # issue 14: {path: (h, layout)}
    alloc = None
    if getattr(args, "allocate", False):
      jobs, alloc = _allocate_jobs(src, args, jobs, key, arg_options)
    entries = []
    bar = progress(len(src.entries), "compress", args.quiet)
    try:
      for i, (comps, path, shape, dtype) in enumerate(src.entries):
        bar.set_postfix_str(f"{path} {_table.shape_str(shape)}")
        tensors, entry = encode_leaf(src, i, jobs.get(path), args, key, arg_options,
                                     stats=calibration.get(path))
        for name, t in tensors:
          writer.add(name, t)
        del tensors
        entries.append(entry)
        release_memory()
        bar.update(1)
    finally:
      bar.close()
    user = user_metadata(args, default, rules, arg_options)
    if args.calibration:
      user["calibration"] = os.path.basename(args.calibration)
    if alloc is not None:
      user["allocation"] = alloc
    writer.finish(_format.header_metadata(entries, writer.crc32, user),
                  commit=lambda: _interrupts.commit(args.output))
  if not args.quiet:
    _table.summary(entries)
    print(f"wrote {args.output} ({_table.fmt_bytes(os.path.getsize(args.output))})")
  return 0


def plan_leaves(src, args, rules, default):
  """The plan of ``src``'s leaves under the rules, and the warnings planning gave."""
  import jax  # noqa: PLC0415

  from jax_signedcut._checkpoint import structure as _structure  # noqa: PLC0415
  from jax_signedcut._core import tree as _tree  # noqa: PLC0415

  shapes = _structure.unflatten(
      [(c, jax.ShapeDtypeStruct(s, d)) for c, _, s, d in src.entries], args.input) \
      if src.entries else {}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      plan, _ = _tree.plan(shapes, rules=rules, skip=args.skip or (), min_dim=args.min_dim,
                           default=default, method_default=args.method)
    except ValueError as e:
      raise CliError(str(e)) from None
  return plan, caught


def encode_leaf(src, i, job, args, key, arg_options, stats=None):
  """Leaf ``i`` of ``src`` compressed under ``job`` (kept as is when None), encoded for a
  writer: ``(tensors, entry)``."""
  import jax  # noqa: PLC0415

  from jax_signedcut._checkpoint import writer as _writer  # noqa: PLC0415
  from jax_signedcut._core import tree as _tree  # noqa: PLC0415

  comps, path, shape, dtype = src.entries[i]
  a = src.get(i)
  source = {"dtype": str(dtype), "nbytes": int(a.nbytes)}
  if job is None:
    return _writer.encode_leaf(comps, a, extra={"source": source})
  a2 = _measure.sum_squares(a)
  x = jax.numpy.asarray(a)
  del a
  method = job.method or args.method
  options = dict(job.options or ()) if job.method is not None or job.options else arg_options
  try:
    f, used = _compress_leaf(x, key=_tree.leaf_key(key, path), job=job, args=args,
                             method=method, options=options, path=path, stats=stats)
  except (ValueError, TypeError) as e:
    raise CliError(f"leaf {path!r} of shape {tuple(shape)}: {e}") from None
  f = jax.block_until_ready(f)
  err = _measure.estimate(a2, f)
  if err is None:
    err = _measure.exact(a2, x, f)
  del x
  budget = _budget_dict(job)
  budget.update(used)
  if method != "signed_cut":
    budget.update(method=method, **({"options": options} if options else {}))
  return _writer.encode_leaf(comps, f, extra={
      "source": source, "method": method, "budget": budget, "rel_error_est": err})


def user_metadata(args, default, rules, arg_options) -> dict:
  """The header's user metadata: the tool, the source and the arguments that made the file."""
  user = {"tool": "jax-signedcut compress", "source": os.path.basename(
      os.path.normpath(args.input)), "seed": args.seed, "method": args.method,
          "default_budget": _budget_dict(default),
          "rules": [[r, _budget_dict(b)] for r, b in rules],
          "skip": list(args.skip or []), "outliers": args.outliers, "min_dim": args.min_dim}
  if arg_options:
    user["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in arg_options.items()}
  if args.lowrank:
    user["lowrank"] = args.lowrank
  return user
