"""The summary table of ``compress`` and ``inspect``: one row per leaf, from the file's metadata."""

from __future__ import annotations

import math
import sys

from jax_signedcut._checkpoint import format as _format
from jax_signedcut._checkpoint import types as _types

HEADER = ["leaf", "shape", "stored as", "before", "after", "bits/w", "rel.err"]


def fmt_bytes(b) -> str:
  if b is None:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(b) < 1024 or unit == "GiB":
      return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
    b /= 1024
  return str(b)


def shape_str(shape) -> str:
  return "x".join(str(d) for d in shape) or "()"


def print_table(rows, header, out=None):
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


def stored_as(entry) -> str:
  """``dense <dtype>``, or the compressed value's description (with its method when not cuts)."""
  if entry["kind"] == "array":
    return f"dense {entry['dtype']}"
  text = _types.describe(entry["value"])
  method = entry.get("method")
  return text if method in (None, "signed_cut") else f"{method}: {text}"


def row(entry, err=None, mark_estimates=False):
  """``(cells, bytes before, bytes after)`` of a leaf entry of a jax_signedcut file.

  ``err``: the measured error, else the entry's estimate is shown (with a ``*``
  when ``mark_estimates``).
  """
  before = entry.get("source", {}).get("nbytes")
  if entry["kind"] == "array":
    shape = entry["shape"]
    after = math.prod(shape) * _format.numpy_dtype(entry["dtype"]).itemsize
    bits = None
    if before is None:
      before = after
  else:
    shape = [*entry["batch_shape"], *entry["shape"]]
    after = entry["nbytes"]
    bits = 8 * after / max(1, math.prod(shape))
    if err is None:
      err = entry.get("rel_error_est")
      if err is not None and mark_estimates:
        err = f"{err:.4f}*"
  cells = [entry["path"], shape_str(shape), stored_as(entry), fmt_bytes(before),
           fmt_bytes(after), "-" if bits is None else f"{bits:.2f}",
           "-" if err is None else err if isinstance(err, str) else f"{err:.4f}"]
  return cells, before, after


def summary(entries, errs=None, out=None):
  """Prints the table of ``entries`` (``errs``: measured errors by entry index) and a total.

  With ``errs``, the errors that are not measured (the entry's estimate) are marked ``*``.
  """
  rows, tb, ta, known = [], 0, 0, True
  for i, e in enumerate(entries):
    cells, b, a = row(e, None if errs is None else errs.get(i), mark_estimates=errs is not None)
    rows.append(cells)
    known = known and b is not None   # a file saved by `save` has no source sizes
    tb += b or 0
    ta += a
  rows.append(["total", "", f"ratio {ta / tb:.3f}" if tb and known else "",
               fmt_bytes(tb) if known else "-", fmt_bytes(ta), "", ""])
  print_table(rows, HEADER, out)

