"""Files of format versions 1 and 2, read as the current types.

In those versions a compressed leaf was ``"kind": "signed_cut"``: one entry
holding the cuts (tensors ``p/s_bits``, ``p/t_bits``, ``p/c``, ``p/num_cuts``,
trimmed to ``stored_width`` of ``width`` slots), optionally the sparse entries
(``p/sparse_idx``, ``p/sparse_val``, ``p/num_sparse``, trimmed to
``stored_sparse`` of ``sparse_slots``; the first two absent when none were
stored) and, in version 2, a bf16 low-rank part (``p/lr_u``, ``p/lr_v`` and
``"lowrank": r``). :func:`entry` rewrites such an entry into the current one
over the same tensors: a ``SignedCut``, or a ``Sum`` of (``LowRankPart``,
``SignedCut``, ``Sparse``) with the parts the leaf had, which is what
``decompose`` gives for the same settings today. :func:`orbax_value` does the
same for the ``{"__signed_cut__": {fields…, "shape"}}`` sub-trees that
``save_orbax`` wrote then.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_signedcut._checkpoint import codec as _codec
from jax_signedcut._parts.lowrank import LowRankPart
from jax_signedcut._parts.sparse import Sparse
from jax_signedcut._parts.sum import Sum
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut.factors import SignedCut

_CUT_FIELDS = ("s_bits", "t_bits", "c", "num_cuts")
_SPARSE_FIELDS = ("sparse_idx", "sparse_val", "num_sparse")
_LOWRANK_FIELDS = ("lr_u", "lr_v")


def entry(e: dict, err) -> dict:
  """The current entry of a version 1/2 leaf entry (arrays are the same in both)."""
  if e.get("kind") != "signed_cut":
    return e
  path = e.get("path")

  def fail(msg):
    return err(f"leaf {path!r}: {msg}")

  try:
    m, n = (int(d) for d in e["shape"])
    batch = [int(d) for d in e["batch_shape"]]
    width, k = int(e["width"]), int(e["stored_width"])
    slots = e.get("sparse_slots")
    ks = int(e.get("stored_sparse", 0) or 0)
    names = e["tensors"]
    rank = e.get("lowrank")
    if not isinstance(names, dict):
      raise TypeError("tensors is not a mapping")
  except (KeyError, TypeError, ValueError) as ex:
    raise fail(f"malformed metadata ({ex!r})") from None
  if m < 1 or n < 1 or any(d < 0 for d in batch):
    raise fail(f"bad shape {(m, n)} / batch shape {batch}")
  if not 1 <= k <= width:
    raise fail(f"stored width {k} is not in 1..width ({width})")
  for f in _CUT_FIELDS:
    if f not in names:
      raise fail(f"no {f} tensor")

  def tensor(field, dtype, shape):
    return {"tensor": names[field], "dtype": dtype, "shape": shape}

  cuts = {"type": "signed_cut", "version": 1, "static": {"shape": [m, n]}, "fields": {
      "s_bits": tensor("s_bits", "U32", [*batch, k, _packing.num_words(m)]),
      "t_bits": tensor("t_bits", "U32", [*batch, k, _packing.num_words(n)]),
      "c": tensor("c", "F32", [*batch, k]),
      "num_cuts": tensor("num_cuts", "I32", batch)}, "slots": {"width": width}}
  parts = [cuts]
  if slots is not None:
    if isinstance(slots, bool) or not isinstance(slots, int) or not 0 <= ks <= slots \
        or "num_sparse" not in names:
      raise fail(f"stored sparse count {ks} not in 0..{slots} or no num_sparse tensor")
    if ks:
      if "sparse_idx" not in names or "sparse_val" not in names:
        raise fail("no sparse_idx/sparse_val tensors")
      idx = tensor("sparse_idx", "I32", [*batch, ks])
      val = tensor("sparse_val", "F32", [*batch, ks])
    else:
      idx, val = {"zeros": [*batch, 0], "dtype": "I32"}, {"zeros": [*batch, 0], "dtype": "F32"}
    parts.append({"type": "sparse", "version": 1, "static": {"shape": [m, n]}, "fields": {
        "idx": idx, "val": val, "count": tensor("num_sparse", "I32", batch)},
        "slots": {"capacity": slots}})
  elif any(x in names for x in _SPARSE_FIELDS):
    raise fail("sparse tensors present but sparse_slots is null")
  if rank is not None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(m, n) \
        or any(x not in names for x in _LOWRANK_FIELDS):
      raise fail(f"lowrank {rank!r} is not an int in 0..{min(m, n)} or no lr_u/lr_v tensors")
    parts.insert(0, {"type": "lowrank_part", "version": 1, "static": {"shape": [m, n]},
                     "fields": {"u": tensor("lr_u", "BF16", [*batch, m, rank]),
                                "v": tensor("lr_v", "BF16", [*batch, n, rank])}})
  elif any(x in names for x in _LOWRANK_FIELDS):
    raise fail("low-rank tensors present but lowrank is null")
  value = parts[0] if len(parts) == 1 else {
      "type": "sum", "version": 1, "static": {},
      "fields": {"parts": {"tuple": [{"node": p} for p in parts]}}}
  known = set(_CUT_FIELDS + _SPARSE_FIELDS + _LOWRANK_FIELDS)
  if set(names) - known:
    raise fail(f"unknown tensors {sorted(set(names) - known)}")
  out = {k: v for k, v in e.items() if k not in (
      "kind", "tensors", "width", "stored_width", "sparse_slots", "stored_sparse", "lowrank")}
  out.update(kind="compressed", type=value["type"], shape=[m, n], batch_shape=batch, value=value)
  return out


def orbax_value(d: dict):
  """The current value of an orbax ``__signed_cut__`` entry (numpy arrays), validated.

  Raises:
    KeyError, TypeError, ValueError: a malformed entry.
  """
  m, n = (int(v) for v in np.asarray(d["shape"]))
  g = lambda k: np.asarray(d[k])  # noqa: E731
  parts = [SignedCut(s_bits=g("s_bits"), t_bits=g("t_bits"), c=g("c"), num_cuts=g("num_cuts"),
                     shape=(m, n))]
  if "sparse_idx" in d:
    parts.append(Sparse(idx=g("sparse_idx"), val=g("sparse_val"), count=g("num_sparse"),
                        shape=(m, n)))
  if "lr_u" in d:
    parts.insert(0, LowRankPart(u=g("lr_u").astype(jnp.bfloat16),
                                v=g("lr_v").astype(jnp.bfloat16), shape=(m, n)))
  for p in parts:
    _codec.codec_for(p).validate(p)
  x = parts[0] if len(parts) == 1 else Sum(tuple(parts))
  _codec.codec_for(x).validate(x)
  return x
