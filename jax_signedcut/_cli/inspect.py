"""``jax-signedcut inspect``: a table of what a compressed file holds, errors on request."""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from jax_signedcut._cli import measure as _measure
from jax_signedcut._cli import table as _table
from jax_signedcut._cli.args import CliError


def run(args) -> int:
  from jax_signedcut._checkpoint import expand as _expand  # noqa: PLC0415
  from jax_signedcut._checkpoint import sharded as _sharded  # noqa: PLC0415
  from jax_signedcut._cli import sources as _sources  # noqa: PLC0415

  errs = None
  with _sharded.open_reader(args.file, verify=args.original is not None) as r:
    if args.original is not None:
      errs = {}
      with _sources.open_source(args.original) as src:
        where = {p: i for i, (_, p, _, _) in enumerate(src.entries)}
        for i, e in enumerate(r.entries):
          if e["kind"] != "compressed":
            continue
          j = where.get(e["path"])
          if j is None:
            print(f"jax-signedcut: warning: {e['path']!r} is not in {args.original}",
                  file=sys.stderr)
            continue
          f = r.leaf(i, full_width=False)
          a = np.asarray(src.get(j), np.float32)
          if a.shape != (*f.batch_shape, *f.shape):
            raise CliError(f"{e['path']!r}: shape {a.shape} in {args.original}, "
                           f"{(*f.batch_shape, *f.shape)} in {args.file}")
          d = np.asarray(_expand.expand_leaf(f, np.float32)) - a
          num, den = _measure.sum_squares(d), _measure.sum_squares(a)
          errs[i] = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    _table.summary(r.entries, errs)
    compressed = sum(e["kind"] == "compressed" for e in r.entries)
    if errs is None:
      print("rel.err: as estimated when compressing (from the greedy's bookkeeping for cuts); "
            "give --original IN to measure it")
    else:
      rest = compressed - len(errs)
      print(f"rel.err: measured against {args.original} for {len(errs)} of {compressed} "
            "compressed leaves" + (f"; {rest} marked * are estimates from compressing (not in "
                                   "the original)" if rest else ""))
    user = r.user_metadata
    if user:
      print("metadata: " + json.dumps(user))
  return 0
