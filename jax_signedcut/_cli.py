"""The ``jax-signedcut`` command: compress, expand and inspect checkpoints.

Run ``jax-signedcut --help`` (or ``python -m jax_signedcut._cli --help``).
:func:`main` takes an argv list and returns the exit status, so it can be
called in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

EPILOG_MAIN = """\
examples:
  # compress every 2-D weight to half the size of its bf16 copy
  jax-signedcut compress model.safetensors model.sc.safetensors --rate 0.5

  # 4 bits per weight, attention projections at 8, embeddings kept dense
  jax-signedcut compress model.safetensors out.safetensors --bits 4 \\
      --rule 'attention=bits=8' --skip 'embed'

  # a dense checkpoint back (bf16), and a look at what was done
  jax-signedcut expand out.safetensors dense.safetensors --dtype bf16
  jax-signedcut inspect out.safetensors --original model.safetensors

Run 'jax-signedcut COMMAND --help' for the options of a command.
"""

EPILOG_COMPRESS = """\
budgets:
  Each selected matrix A (m x n) is stored as w signed cuts A ~ S diag(c) T^T
  (S, T are +-1 sign matrices packed 32 to a word). The budget fixes w:
    --rate R        storage = R x the bf16 size (2 bytes per weight); 0.5 halves it
    --bits B        storage = B bits per weight (--rate 0.5 == --bits 8)
    --width W       exactly W cuts per matrix
    --max-error E   stop once the relative Frobenius error is <= E
                    (capped by --rate/--bits/--width if given, else by rate 1)
  --rule REGEX=BUDGET picks a budget per leaf: the first rule whose regex
  matches (re.search) the leaf's name wins. BUDGET is one of
    rate=0.25   bits=4   width=128   max_error=0.05   dense
  or several joined by commas (e.g. 'rate=0.5,max_error=0.01,outliers=0';
  'pos=bits=2,lowrank=16' adds a rank-16 bf16 part paid from the budget).
  Leaves no rule matches get the default budget (--rate/--bits/--width/
  --max-error); without one they are kept as they are.

what is compressed:
  Float leaves with ndim >= 2 whose last two dims are both >= --min-dim
  (16); leading dims (stacked layers) are compressed as a batch. 1-D leaves
  (biases, norm scales), integer leaves and leaves matching --skip are copied
  unchanged.

  Outliers: by default ('auto') the few entries more than 6 robust standard
  deviations from the median (at most 0.5 %%) are stored apart (8 bytes each,
  paid from the same budget); Gaussian-like matrices get none.

inputs and outputs:
  IN is a .safetensors file, a directory of .safetensors shards, or an orbax
  checkpoint directory. OUT is a .safetensors file (jax_signedcut format,
  readable with jax_signedcut.load). Matrices are read, compressed and
  written one at a time, so memory stays near one matrix's working set (an
  orbax input leaf by leaf too). The output appears only when complete.

examples:
  jax-signedcut compress model.safetensors out.safetensors --rate 0.5
  jax-signedcut compress ckpt_dir/ out.safetensors --bits 4 --rule 'mlp=bits=2' \\
      --rule 'lm_head=dense' --seed 1
  jax-signedcut compress model.safetensors out.safetensors --max-error 0.05 --rate 1
"""

EPILOG_EXPAND = """\
OUT ending in .safetensors gets a plain safetensors file whose tensor names
are the leaf names; any other OUT is written as an orbax checkpoint directory
(nested like the compressed tree). Leaves that were kept dense are copied
with their own dtype.

examples:
  jax-signedcut expand out.safetensors dense.safetensors --dtype bf16
  jax-signedcut expand out.safetensors dense_ckpt/ --dtype f32
  jax-signedcut expand out.safetensors quarter.safetensors --truncate-rate 0.25
"""

EPILOG_INSPECT = """\
Columns: leaf name, shape, stored as (cuts used/slots, sparse entries),
bytes before (the source dtype) and after, bits per weight, and the relative
Frobenius error: estimated from the greedy's own bookkeeping, or measured
against the original checkpoint with --original.

examples:
  jax-signedcut inspect out.safetensors
  jax-signedcut inspect out.safetensors --original model.safetensors
"""


class _Error(Exception):
  """A user-facing error: printed as one line."""


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage dump)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------
# Budgets


def _positive(kind):
  def conv(s):
    try:
      v = int(s) if kind == "width" else float(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{kind} must be a {'whole' if kind == 'width' else ''} "
                                       f"number, got {s!r}".replace("  ", " ")) from None
    if not math.isfinite(v) or v <= 0:
      raise argparse.ArgumentTypeError(f"{kind} must be > 0, got {s!r}")
    return v
  return conv


def _outliers_arg(s):
  if s == "auto":
    return "auto"
  try:
    v = float(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"outliers must be auto, 0 or a fraction in (0, 1), "
                                     f"got {s!r}") from None
  if not 0 <= v < 1:
    raise argparse.ArgumentTypeError(f"outliers must be auto, 0 or a fraction in (0, 1), "
                                     f"got {s!r}")
  return 0 if v == 0 else v


_BUDGET_KEYS = {"rate": "rate", "bits": "bits_per_weight", "bits_per_weight": "bits_per_weight",
                "width": "width", "max_error": "max_error", "max-error": "max_error",
                "outliers": "outliers", "lowrank": "lowrank"}


def _lowrank_arg(s):
  if s == "auto":
    return s
  try:
    v = int(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"lowrank must be an int >= 0 or auto, got {s!r}") from None
  if v < 0:
    raise argparse.ArgumentTypeError(f"lowrank must be an int >= 0 or auto, got {s!r}")
  return v


def parse_budget(text: str):
  """A :class:`Budget` (or ``None`` for ``dense``) from ``rate=0.25,max_error=0.05``."""
  from jax_signedcut._core.tree import Budget  # noqa: PLC0415

  text = text.strip()
  if text == "dense":
    return None
  fields = {}
  for part in text.split(","):
    key, sep, value = part.strip().partition("=")
    if not sep or key not in _BUDGET_KEYS:
      raise argparse.ArgumentTypeError(
          f"bad budget {text!r}: expected e.g. rate=0.25, bits=4, width=128, max_error=0.05 "
          "or dense")
    name = _BUDGET_KEYS[key]
    conv = _outliers_arg if name == "outliers" else _lowrank_arg if name == "lowrank" else \
        _positive("width" if name == "width" else key)
    try:
      fields[name] = conv(value)
    except argparse.ArgumentTypeError as e:
      raise argparse.ArgumentTypeError(f"bad budget {text!r}: {e}") from None
  if not any(k in fields for k in ("rate", "bits_per_weight", "width")):
    if "max_error" not in fields:
      raise argparse.ArgumentTypeError(f"bad budget {text!r}: give rate, bits, width or "
                                       "max_error")
    fields["rate"] = 1.0   # max_error alone: capped at the bf16 size
  if sum(k in fields for k in ("rate", "bits_per_weight", "width")) > 1:
    raise argparse.ArgumentTypeError(f"bad budget {text!r}: give only one of rate, bits, width")
  return Budget(**fields)


def _rule_arg(text: str):
  if text.endswith("=dense"):
    regex, budget = text[:-len("=dense")], "dense"
  else:
    # REGEX=KEY=VALUE[,KEY=VALUE...]: the budget starts at the first KEY= that
    # follows a '='.
    cut = None
    for key in _BUDGET_KEYS:
      i = text.find("=" + key + "=")
      if i >= 0 and (cut is None or i < cut):
        cut = i
    if cut is None:
      raise argparse.ArgumentTypeError(
          f"bad rule {text!r}: expected REGEX=BUDGET, e.g. 'attn=rate=0.25' or 'embed=dense'")
    regex, budget = text[:cut], text[cut + 1:]
  import re  # noqa: PLC0415
  try:
    re.compile(regex)
  except re.error as e:
    raise argparse.ArgumentTypeError(f"bad rule {text!r}: bad regex {regex!r}: {e}") from None
  try:
    return regex, parse_budget(budget)
  except argparse.ArgumentTypeError as e:
    raise argparse.ArgumentTypeError(f"bad rule {text!r}: {e}") from None


def _default_budget(args):
  from jax_signedcut._core.tree import Budget  # noqa: PLC0415

  if args.rate is None and args.bits is None and args.width is None:
    if args.max_error is None:
      return None
    return Budget(rate=1.0, max_error=args.max_error)
  return Budget(width=args.width, rate=args.rate, bits_per_weight=args.bits,
                max_error=args.max_error)


# ----------------------------------------------------------------------------
# Inputs


class _Source:
  """A dense checkpoint read leaf by leaf: ``entries`` and ``get(i)``."""

  entries: list    # [(key components, path, shape, np.dtype)]

  def get(self, i: int) -> np.ndarray:
    raise NotImplementedError

  def close(self):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _SafetensorsSource(_Source):

  def __init__(self, files):
    from jax_signedcut import _checkpoint  # noqa: PLC0415

    self._files, self._where, self.entries = [], [], []
    try:
      self._open(files)
    except BaseException:
      self.close()
      raise

  def _open(self, files):
    from jax_signedcut import _checkpoint  # noqa: PLC0415

    seen = {}
    for file in files:
      f = _checkpoint.TensorFile(file)
      self._files.append(f)
      if f.metadata.get("format") == _checkpoint.FORMAT:
        raise _Error(f"{file}: is already a jax_signedcut (compressed) checkpoint; use "
                     "'expand', or load it with truncate_rate= to lower its rate")
      for name in f.keys():
        if name in seen:
          raise _Error(f"{file}: tensor {name!r} is also in {seen[name]}")
        seen[name] = file
        dtype = f.dtype(name)
        if dtype is None:
          raise _Error(f"{file}: tensor {name!r} has a dtype this tool cannot read")
        self.entries.append(([["d", name]], name, f.shape(name), dtype))
        self._where.append((f, name))

  def get(self, i):
    f, name = self._where[i]
    return f.get(name)

  def close(self):
    for f in self._files:
      f.close()
    self._files = []


class _OrbaxSource(_Source):
  """An orbax checkpoint read one leaf at a time (partial restores)."""

  def __init__(self, directory):
    from jax_signedcut import _checkpoint  # noqa: PLC0415

    self._dir = directory
    specs, self._tree = _checkpoint.orbax_leaf_specs(directory)
    self.entries = [(comps, _checkpoint.path_of(comps), shape, dtype)
                    for comps, shape, dtype in specs]

  def get(self, i):
    from jax_signedcut import _checkpoint  # noqa: PLC0415

    return _checkpoint.restore_orbax_leaf(self._dir, self._tree, i)


def _open_source(path) -> _Source:
  from jax_signedcut import _checkpoint  # noqa: PLC0415

  if not os.path.exists(path):
    raise _Error(f"{path}: no such file or directory")
  if os.path.isdir(path):
    if _checkpoint.is_orbax_dir(path):
      return _OrbaxSource(path)
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
      raise _Error(f"{path}: a directory with neither .safetensors shards nor an orbax "
                   "checkpoint")
    return _SafetensorsSource(shards)
  return _SafetensorsSource([path])


# ----------------------------------------------------------------------------
# Tables


def _fmt_bytes(b) -> str:
  if b is None:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(b) < 1024 or unit == "GiB":
      return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
    b /= 1024
  return str(b)


def _table(rows, header, out=None):
  out = out or sys.stdout
  rows = [[str(c) for c in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)]
  line = lambda cells: "  ".join(  # noqa: E731
      c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  print(line(header), file=out)
  print("  ".join("-" * w for w in widths), file=out)
  for r in rows:
    print(line(r), file=out)


def _shape_str(entry_or_shape) -> str:
  return "x".join(str(d) for d in entry_or_shape) or "()"


def _row(entry, err=None):
  """A table row for a leaf entry of a jax_signedcut file."""
  src = entry.get("source", {})
  before = src.get("nbytes")
  if entry["kind"] == "array":
    after = int(np.prod(entry["shape"])) * np.dtype(_np_dtype(entry["dtype"])).itemsize
    stored = f"dense {entry['dtype']}"
    shape = entry["shape"]
    bits = None
    if before is None:
      before = after
  else:
    shape = [*entry["batch_shape"], *entry["shape"]]
    after = entry["nbytes"]
    stored = f"cuts {entry['stored_width']}/{entry['width']}"
    if entry.get("stored_sparse"):
      stored += f" +{entry['stored_sparse']} sparse"
    if entry.get("lowrank"):
      stored += f" +rank {entry['lowrank']}"
    bits = 8 * after / max(1, int(np.prod(shape)))
    if err is None:
      err = entry.get("rel_error_est")
  return [entry["path"], _shape_str(shape), stored, _fmt_bytes(before), _fmt_bytes(after),
          "-" if bits is None else f"{bits:.2f}", "-" if err is None else f"{err:.4f}"], \
      before, after


def _np_dtype(name):
  import jax.numpy as jnp  # noqa: PLC0415

  return jnp.bfloat16 if name == "bfloat16" else np.dtype(name)


_HEADER = ["leaf", "shape", "stored as", "before", "after", "bits/w", "rel.err"]


def _summary(entries, errs=None, out=None):
  rows, tb, ta = [], 0, 0
  for i, e in enumerate(entries):
    row, b, a = _row(e, None if errs is None else errs.get(i))
    rows.append(row)
    tb += b or 0
    ta += a
  rows.append(["total", "", f"ratio {ta / tb:.3f}" if tb else "", _fmt_bytes(tb),
               _fmt_bytes(ta), "", ""])
  _table(rows, _HEADER, out)


# ----------------------------------------------------------------------------
# Commands


def _progress(total, desc, quiet):
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(total=total, desc=desc, unit="leaf", disable=True if quiet else None,
              file=sys.stderr, leave=False)


def _rel_error_estimate(a2: float, f) -> float:
  """‖A − reconstruct(f)‖/‖A‖ from the greedy's bookkeeping (no reconstruction).

  Each cut is the projection of the remainder on s tᵀ, so ‖R_k‖² =
  ‖A − sparse‖² − m·n·Σ c_j²; the sparse entries are exact copies of entries of A.
  """
  m, n = f.shape
  sp2 = 0.0 if f.sparse_val is None else float(np.sum(np.square(np.asarray(f.sparse_val,
                                                                           np.float64))))
  c2 = float(np.sum(np.square(np.asarray(f.c, np.float64))))
  r2 = max(0.0, a2 - sp2 - m * n * c2)
  return math.sqrt(r2 / a2) if a2 > 0 else 0.0


def _rel_error_exact(a2: float, a, f) -> float:
  """‖A − reconstruct(f)‖/‖A‖ by reconstruction (factors with a low-rank part)."""
  from jax_signedcut._signedcut import factors as _factors  # noqa: PLC0415

  r = np.asarray(a, np.float32) - np.asarray(_factors.reconstruct(f))
  r2 = float(np.sum(np.square(r, dtype=np.float64)))
  return math.sqrt(r2 / a2) if a2 > 0 else 0.0


def _release_memory() -> None:
  """Hands freed heap pages back to the OS between matrices (glibc only).

  Without it glibc keeps the freed buffers of one matrix around and the next
  matrix's land next to them, so the peak creeps up over the first few.
  """
  try:
    import ctypes  # noqa: PLC0415
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _sum_squares(a: np.ndarray) -> float:
  flat = a.reshape(-1)
  step = 1 << 22     # chunks, so the float64 copy stays small
  return float(sum(np.sum(np.square(flat[i:i + step], dtype=np.float64))
                   for i in range(0, flat.size, step)))


def _compress(args) -> int:
  import jax  # noqa: PLC0415

  from jax_signedcut import _checkpoint  # noqa: PLC0415
  from jax_signedcut._signedcut import decompose as _decompose
  from jax_signedcut._core import tree as _tree

  default = _default_budget(args)
  rules = list(args.rule or [])
  if default is None and not any(b is not None for _, b in rules):
    raise _Error("no budget: give --rate, --bits, --width or --max-error (or a --rule with a "
                 "budget)")
  key = jax.random.key(args.seed)
  with _open_source(args.input) as src, _checkpoint.Writer(args.output) as writer:
    shapes = _checkpoint.unflatten(
        [(c, jax.ShapeDtypeStruct(s, d)) for c, _, s, d in src.entries], args.input) \
        if src.entries else {}
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      try:
        plan, _ = _tree.plan(shapes, rules=rules, skip=args.skip or (), min_dim=args.min_dim,
                             default=default)
      except ValueError as e:
        raise _Error(str(e)) from None
    for w in caught:
      print(f"jax-signedcut: warning: {w.message}", file=sys.stderr)
    jobs = dict(zip(plan.paths, plan.jobs))
    entries = []
    bar = _progress(len(src.entries), "compress", args.quiet)
    try:
      for i, (comps, path, shape, dtype) in enumerate(src.entries):
        job = jobs.get(path)
        bar.set_postfix_str(f"{path} {_shape_str(shape)}")
        a = src.get(i)
        source = {"dtype": str(dtype), "nbytes": int(a.nbytes)}
        if job is None:
          tensors, entry = _checkpoint.encode_leaf(comps, a, extra={"source": source})
        else:
          a2 = _sum_squares(a)
          x = jax.numpy.asarray(a)
          del a
          outliers = args.outliers if job.outliers is None else job.outliers
          lowrank = args.lowrank if job.lowrank is None else job.lowrank
          try:
            # x is ours: the outliers are zeroed in its buffer (no remainder copy);
            # with a low-rank part it is kept to measure the error exactly.
            f = _decompose._decompose_leaf(  # noqa: SLF001
                x, key=_tree.leaf_key(key, path), width=job.width, rate=job.rate,
                bits_per_weight=job.bits_per_weight, max_error=job.max_error,
                outliers=outliers, backend=args.backend, donate=not lowrank,
                progress_desc=None if args.quiet else path, lowrank=lowrank)
          except (ValueError, TypeError) as e:
            raise _Error(f"leaf {path!r} of shape {_shape_str(shape)}: {e}") from None
          f = jax.block_until_ready(f)
          err = _rel_error_estimate(a2, f) if not lowrank else _rel_error_exact(a2, x, f)
          del x
          budget = {k: v for k, v in job._asdict().items() if v is not None}
          budget.setdefault("outliers", outliers)
          if lowrank:
            budget.setdefault("lowrank", lowrank)
          tensors, entry = _checkpoint.encode_leaf(comps, f, extra={
              "source": source, "budget": budget, "rel_error_est": err})
          del f
        for name, t in tensors:
          writer.add(name, t)
        del tensors
        entries.append(entry)
        _release_memory()
        bar.update(1)
    finally:
      bar.close()
    user = {"tool": "jax-signedcut compress", "source": os.path.basename(
        os.path.normpath(args.input)), "seed": args.seed,
            "default_budget": None if default is None else {
                k: v for k, v in default._asdict().items() if v is not None},
            "rules": [[r, None if b is None else {k: v for k, v in b._asdict().items()
                                                  if v is not None}] for r, b in rules],
            "skip": list(args.skip or []), "outliers": args.outliers, "min_dim": args.min_dim}
    if args.lowrank:
      user["lowrank"] = args.lowrank
    writer.finish(_checkpoint.header_metadata(entries, writer.crc32, user))
  if not args.quiet:
    _summary(entries)
    print(f"wrote {args.output} ({_fmt_bytes(os.path.getsize(args.output))})")
  return 0


def _dtype_arg(s):
  import jax.numpy as jnp  # noqa: PLC0415

  table = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f32": jnp.float32,
           "float32": jnp.float32}
  if s not in table:
    raise argparse.ArgumentTypeError(f"dtype must be bf16 or f32, got {s!r}")
  return table[s]


def _expand(args) -> int:
  import jax  # noqa: PLC0415

  from jax_signedcut import _checkpoint  # noqa: PLC0415
  from jax_signedcut._signedcut import factors as _factors
  from jax_signedcut._signedcut.factors import SignedCut  # noqa: PLC0415

  to_orbax = not args.output.endswith(".safetensors")
  if to_orbax and os.path.exists(args.output):
    raise _Error(f"{args.output}: exists; an orbax output directory must be new (or name a "
                 ".safetensors file)")
  trunc = {"rate": args.truncate_rate, "bits_per_weight": args.truncate_bits}
  with _checkpoint.Reader(args.input) as r:
    bar = _progress(len(r.entries), "expand", args.quiet)

    def leaves():
      for i, e in enumerate(r.entries):
        bar.set_postfix_str(e["path"])
        leaf = r.leaf(i, full_width=False)
        if isinstance(leaf, SignedCut):
          if any(v is not None for v in trunc.values()):
            try:
              leaf = _factors.truncate(leaf, **{k: v for k, v in trunc.items() if v is not None})
            except ValueError as ex:
              raise _Error(f"leaf {e['path']!r}: {ex}") from None
          leaf = np.asarray(jax.block_until_ready(_checkpoint.expand_leaf(leaf, args.dtype)))
        yield e, leaf
        bar.update(1)

    try:
      if to_orbax:
        items = [(e["key"], leaf) for e, leaf in leaves()]
        tree = _checkpoint.unflatten(items, args.input)
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
          raise _Error(f"{args.output}: the directory {parent} does not exist")
        tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
        try:
          _checkpoint.save_orbax(os.path.join(tmp, "ckpt"), tree)
          os.replace(os.path.join(tmp, "ckpt"), args.output)
        finally:
          shutil.rmtree(tmp, ignore_errors=True)
      else:
        with _checkpoint.Writer(args.output) as w:
          for e, leaf in leaves():
            w.add(e["tensor"] if e["kind"] == "array" else e["path"], leaf)
          w.finish({"format": "np", "expanded_from": os.path.basename(args.input)})
    finally:
      bar.close()
  if not args.quiet:
    print(f"wrote {args.output}")
  return 0


def _inspect(args) -> int:
  from jax_signedcut import _checkpoint  # noqa: PLC0415
  from jax_signedcut._signedcut.factors import SignedCut  # noqa: PLC0415

  errs = None
  with _checkpoint.Reader(args.file, verify=args.original is not None) as r:
    if args.original is not None:
      errs = {}
      with _open_source(args.original) as src:
        where = {p: i for i, (_, p, _, _) in enumerate(src.entries)}
        for i, e in enumerate(r.entries):
          if e["kind"] != "signed_cut":
            continue
          j = where.get(e["path"])
          if j is None:
            print(f"jax-signedcut: warning: {e['path']!r} is not in {args.original}",
                  file=sys.stderr)
            continue
          f = r.leaf(i, full_width=False)
          assert isinstance(f, SignedCut)
          a = np.asarray(src.get(j), np.float32)
          if a.shape != (*f.batch_shape, *f.shape):
            raise _Error(f"{e['path']!r}: shape {a.shape} in {args.original}, "
                         f"{(*f.batch_shape, *f.shape)} in {args.file}")
          d = np.asarray(_checkpoint.expand_leaf(f, np.float32)) - a
          num, den = _sum_squares(d), _sum_squares(a)
          errs[i] = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    _summary(r.entries, errs)
    user = r.user_metadata
    if user:
      print("metadata: " + json.dumps(user))
  return 0


# ----------------------------------------------------------------------------
# Parser and main


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jax-signedcut",
              description="Compress model checkpoints with 1-bit signed cut decompositions "
              "(A ~ S diag(c) T^T with +-1 matrices S, T), expand them back, inspect them.",
              epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
  sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  sub.required = True

  c = sub.add_parser("compress", help="compress a dense checkpoint",
                     description="Compress the matrices of a dense checkpoint into signed cuts.",
                     epilog=EPILOG_COMPRESS, formatter_class=argparse.RawDescriptionHelpFormatter)
  c.add_argument("input", metavar="IN", help=".safetensors file, directory of shards, or orbax "
                 "checkpoint directory")
  c.add_argument("output", metavar="OUT", help="output .safetensors file")
  g = c.add_mutually_exclusive_group()
  g.add_argument("--rate", type=_positive("rate"), metavar="R",
                 help="default budget: fraction of the bf16 size (0.5 = half)")
  g.add_argument("--bits", type=_positive("bits"), metavar="B",
                 help="default budget: bits per weight")
  g.add_argument("--width", type=_positive("width"), metavar="W",
                 help="default budget: number of cuts per matrix")
  c.add_argument("--max-error", type=_positive("max-error"), metavar="E",
                 help="stop a matrix once its relative error is <= E")
  c.add_argument("--rule", action="append", type=_rule_arg, metavar="REGEX=BUDGET",
                 help="per-leaf budget, first match wins (repeatable; see below)")
  c.add_argument("--skip", action="append", metavar="REGEX",
                 help="keep dense every leaf whose name matches REGEX (repeatable)")
  c.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of the cuts (default 0)")
  c.add_argument("--outliers", type=_outliers_arg, default="auto", metavar="auto|0|FRACTION",
                 help="entries stored apart (default auto)")
  c.add_argument("--lowrank", type=_lowrank_arg, default=0, metavar="R|auto",
                 help="rank of a bf16 low-rank part paid from the budget (default 0: none; "
                 "auto: the best of 0, 4, 8, 16, 32 per matrix, one decomposition each)")
  c.add_argument("--min-dim", type=int, default=16, metavar="N",
                 help="compress only matrices with both dims >= N (default 16)")
  c.add_argument("--backend", default="auto", choices=("auto", "jnp", "ffi"),
                 help=argparse.SUPPRESS)
  c.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
  c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks on errors")
  c.set_defaults(func=_compress)

  e = sub.add_parser("expand", help="a dense checkpoint from a compressed one",
                     description="Expand a compressed checkpoint back to dense matrices.",
                     epilog=EPILOG_EXPAND, formatter_class=argparse.RawDescriptionHelpFormatter)
  e.add_argument("input", metavar="IN", help="compressed .safetensors file")
  e.add_argument("output", metavar="OUT", help="output .safetensors file or orbax directory")
  e.add_argument("--dtype", type=_dtype_arg, default="bf16", metavar="bf16|f32",
                 help="dtype of the expanded matrices (default bf16)")
  t = e.add_mutually_exclusive_group()
  t.add_argument("--truncate-rate", type=_positive("rate"), metavar="R",
                 help="first keep only the cuts that rate R pays for")
  t.add_argument("--truncate-bits", type=_positive("bits"), metavar="B",
                 help="first keep only the cuts that B bits per weight pay for")
  e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
  e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks on errors")
  e.set_defaults(func=_expand)

  i = sub.add_parser("inspect", help="a table of what a compressed checkpoint holds",
                     description="List the leaves of a compressed checkpoint.",
                     epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
  i.add_argument("file", metavar="FILE", help="compressed .safetensors file")
  i.add_argument("--original", metavar="IN",
                 help="the dense checkpoint it came from: measure the relative errors")
  i.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks on errors")
  i.set_defaults(func=_inspect)
  return p


def _message(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    return f"{e.filename}: {e.strerror}"
  return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
  """Runs the command line; returns the exit status.

  Example:
    >>> main(["inspect", "/no/such/file.safetensors"])
    1
  """
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 2
  try:
    return args.func(args)
  except KeyboardInterrupt:
    print("jax-signedcut: interrupted; no output was written", file=sys.stderr)
    return 130
  except (_Error, ValueError, TypeError, OSError) as e:
    if getattr(args, "debug", False):
      raise
    print(f"jax-signedcut: error: {_message(e)}", file=sys.stderr)
    return 1
  except Exception as e:  # noqa: BLE001  (anything else is a bug: still one line)
    if getattr(args, "debug", False):
      raise
    print(f"jax-signedcut: internal error: {type(e).__name__}: {_message(e)} (run with "
          "--debug for the traceback)", file=sys.stderr)
    return 3


if __name__ == "__main__":
  with contextlib.suppress(BrokenPipeError):
    sys.exit(main())
