"""The codec registration of every compressed type: its file name, version and checks.

Each ``validate`` runs on the decoded value (numpy arrays, trimmed slots not
yet padded back) and raises ``ValueError`` naming the field and both values.
It checks what a reader relies on: dtypes, shapes against the static fields
and the batch shape, counts and indices in range, finite scales, zero padding
bits, so that a corrupt or hand-edited file never comes back as garbage.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jax_signedcut._checkpoint import codec as _codec
from jax_signedcut._methods import rtn as _rtn
from jax_signedcut._methods.lplr import LowRank
from jax_signedcut._methods.rtn import QuantizedMatrix
from jax_signedcut._parts import blocks as _blocks
from jax_signedcut._parts.blocks import RowBlocks
from jax_signedcut._parts.scaled import InputScaled, Transposed
from jax_signedcut._parts.lowrank import LowRankPart
from jax_signedcut._parts.sparse import Sparse
from jax_signedcut._parts.sum import Sum
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut.factors import SignedCut
from jax_signedcut._signedcut.tensor import SignedTensorCut

_BF16 = np.dtype(jnp.bfloat16)

def expect(x, name: str, dtype, shape) -> None:
  """``x`` is a numpy array of ``dtype`` and ``shape``, else a ValueError quoting both."""
  if not isinstance(x, np.ndarray):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if x.dtype != np.dtype(dtype):
    raise ValueError(f"{name} has dtype {x.dtype}, expected {np.dtype(dtype)}")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _dims(shape, k: int, name="shape") -> tuple[int, ...]:
  if not isinstance(shape, tuple) or len(shape) != k or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
    raise ValueError(f"{name} must be {k} positive ints, got {shape!r}")
  return shape


def _range(x) -> str:
  return f"{int(np.min(x))}..{int(np.max(x))}" if np.size(x) else "(empty)"


def _finite(x, name):
  if not np.all(np.isfinite(np.asarray(x, np.float32))):
    raise ValueError(f"{name} contains NaN/Inf")


#: Bytes of zero slots the values being decoded may still add (None: no limit). A
#: reader sets it from the file's size (:func:`padding_limit`), so that a header
#: that claims a huge width cannot make a small file allocate gigabytes.
_PAD_BUDGET: contextvars.ContextVar = contextvars.ContextVar("pad_budget", default=None)


@contextlib.contextmanager
def padding_limit(budget: list):
  """Within the block, padding zero slots back may add at most ``budget[0]`` bytes.

  ``budget = [bytes left, what names the limit in an error]`` is updated in
  place, so one budget can span the leaves of a file.
  """
  token = _PAD_BUDGET.set(budget)
  try:
    yield
  finally:
    _PAD_BUDGET.reset(token)


def _pad_axis(a, axis, size):
  pad = size - a.shape[axis]
  if pad <= 0:
    return a
  budget = _PAD_BUDGET.get()
  if budget is not None:
    add = pad * (a.size // max(1, a.shape[axis])) * a.dtype.itemsize
    if add > budget[0]:
      raise ValueError(f"padding {a.shape[axis]} stored slots to {size} would add {add} bytes "
                       f"of zeros, more than {budget[1]} may expand to")
    budget[0] -= add
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return np.pad(a, widths)


def _max_count(x) -> int:
  return int(np.max(np.asarray(x))) if np.size(x) else 0


def _tail_bits_clear(words, d, name):
  if d % 32 and np.size(words) and np.any(words[..., -1] >> np.uint32(d % 32)):
    raise ValueError(f"{name} has bits set past the {d} signs of a cut")


# ----------------------------------------------------------------------------
# Signed cuts: only the used cut slots are written.


def _cuts_validate(f: SignedCut) -> None:
  m, n = _dims(f.shape, 2)
  if not isinstance(f.num_cuts, np.ndarray):
    raise ValueError("num_cuts must be an array")
  batch = f.num_cuts.shape
  if not isinstance(f.c, np.ndarray) or f.c.ndim != len(batch) + 1:
    raise ValueError(f"c must have shape {batch} + (stored width,), got "
                     f"{getattr(f.c, 'shape', None)}")
  k = f.c.shape[-1]
  expect(f.num_cuts, "num_cuts", np.int32, batch)
  expect(f.c, "c", np.float32, (*batch, k))
  expect(f.s_bits, "s_bits", np.uint32, (*batch, k, _packing.num_words(m)))
  expect(f.t_bits, "t_bits", np.uint32, (*batch, k, _packing.num_words(n)))
  if np.any(f.num_cuts < 0) or np.any(f.num_cuts > k):
    raise ValueError(f"num_cuts {_range(f.num_cuts)} outside 0..{k} (the stored width)")
  _finite(f.c, "the scales c")
  past = np.arange(k) >= f.num_cuts[..., None]
  if np.any(f.c[past] != 0):
    raise ValueError("cut slots past num_cuts have non-zero scales")
  _tail_bits_clear(f.s_bits, m, "s_bits")
  _tail_bits_clear(f.t_bits, n, "t_bits")


def _cuts_trim(f: SignedCut):
  used = max(1, min(f.width, _max_count(f.num_cuts)))
  g = dataclasses.replace(f, s_bits=np.asarray(f.s_bits)[..., :used, :],
                          t_bits=np.asarray(f.t_bits)[..., :used, :],
                          c=np.asarray(f.c)[..., :used])
  return g, {"width": int(f.width)}


def _cuts_pad(f: SignedCut, slots):
  width = _slot_count(slots, "width", f.width, _INT32_MAX)
  return dataclasses.replace(f, s_bits=_pad_axis(f.s_bits, -2, width),
                             t_bits=_pad_axis(f.t_bits, -2, width), c=_pad_axis(f.c, -1, width))


_INT32_MAX = 2**31 - 1


def _slot_count(slots, key, stored, most):
  if not isinstance(slots, dict) or set(slots) != {key} or isinstance(slots.get(key), bool) \
      or not isinstance(slots.get(key), int) or not max(stored, 0) <= slots[key] <= most:
    raise ValueError(f"slots {str(slots)[:100]}: {key} must be an int in {stored}..{most} "
                     f"(the {stored} stored .. the most there can be)")
  return slots[key]


# ----------------------------------------------------------------------------
# Sparse entries: only the used slots are written.


def _sparse_validate(s: Sparse) -> None:
  m, n = _dims(s.shape, 2)
  if not isinstance(s.count, np.ndarray):
    raise ValueError("count must be an array")
  batch = s.count.shape
  if not isinstance(s.idx, np.ndarray) or s.idx.ndim != len(batch) + 1:
    raise ValueError(f"idx must have shape {batch} + (slots,), got {getattr(s.idx, 'shape', None)}")
  k = s.idx.shape[-1]
  expect(s.count, "count", np.int32, batch)
  expect(s.idx, "idx", np.int32, (*batch, k))
  expect(s.val, "val", np.float32, (*batch, k))
  if np.any(s.count < 0) or np.any(s.count > k):
    raise ValueError(f"count {_range(s.count)} outside 0..{k} (the stored slots)")
  used = np.arange(k) < s.count[..., None]
  if np.any(used & ((s.idx < 0) | (s.idx >= m * n))):
    raise ValueError(f"sparse indices out of range 0..{m * n - 1} (shape {(m, n)})")
  if np.any(~used & ((s.idx != 0) | (s.val != 0))):
    raise ValueError("sparse slots past count are not zero")
  _finite(s.val, "the sparse values")
  if k > 1 and np.any(used[..., 1:] & (np.diff(s.idx, axis=-1) <= 0)):
    raise ValueError("sparse indices are not strictly ascending")


def _sparse_trim(s: Sparse):
  k = min(s.capacity, _max_count(s.count))
  g = dataclasses.replace(s, idx=np.asarray(s.idx)[..., :k], val=np.asarray(s.val)[..., :k])
  return g, {"capacity": int(s.capacity)}


def _sparse_pad(s: Sparse, slots):
  m, n = s.shape
  cap = _slot_count(slots, "capacity", s.capacity, min(m * n, _INT32_MAX))
  return dataclasses.replace(s, idx=_pad_axis(s.idx, -1, cap), val=_pad_axis(s.val, -1, cap))


# ----------------------------------------------------------------------------
# The bf16 low-rank part, a sum of parts.


def _lowrank_part_validate(p: LowRankPart) -> None:
  m, n = _dims(p.shape, 2)
  if not isinstance(p.u, np.ndarray) or p.u.ndim < 2:
    raise ValueError(f"u must be an array (..., {m}, r), got {getattr(p.u, 'shape', None)}")
  batch, r = p.u.shape[:-2], p.u.shape[-1]
  if r > min(m, n):
    raise ValueError(f"rank {r} exceeds min(m, n) = {min(m, n)}")
  expect(p.u, "u", _BF16, (*batch, m, r))
  expect(p.v, "v", _BF16, (*batch, n, r))
  _finite(p.u, "the low-rank factor u")
  _finite(p.v, "the low-rank factor v")


def _sum_validate(s: Sum | RowBlocks) -> None:
  batches = {tuple(p.batch_shape) for p in s.parts}
  if len(batches) != 1:
    raise ValueError(f"parts have different batch shapes {sorted(batches)}")


def _input_scaled_validate(p: InputScaled) -> None:
  m, _ = _dims(p.shape, 2)
  expect(p.scale, "scale", np.dtype(np.float32), (*p.inner.batch_shape, m))
  _finite(p.scale, "the input scales")
  if np.any(p.scale <= 0):
    raise ValueError("the input scales must be > 0")


def _row_blocks_validate(p: RowBlocks) -> None:
  _sum_validate(p)   # one batch shape (the parts' columns agree: RowBlocks checks on creation)
  m = sum(p.sizes)
  expect(p.perm, "perm", np.int32, (*p.parts[0].batch_shape, m))
  if not _blocks.is_permutation(p.perm, m):
    raise ValueError(f"perm is not a permutation of the {m} rows")


# ----------------------------------------------------------------------------
# RTN codes, LPLR/DSVD/lp factors, tensor cuts.


def _quantized_validate(q: QuantizedMatrix) -> None:
  r, c = _dims(q.shape, 2)
  _rtn.check_bits(q.bits, grid=_rtn.check_grid(q.grid))
  gs = q.group_size
  if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
    raise ValueError(f"group_size must be None or a positive int, got {gs!r}")
  if not isinstance(q.codes, np.ndarray) or q.codes.ndim < 2:
    raise ValueError(f"codes must be an array (..., {r}, words), got "
                     f"{getattr(q.codes, 'shape', None)}")
  batch = q.codes.shape[:-2]
  expect(q.codes, "codes", np.uint32, (*batch, r, _rtn.code_words(c, q.bits)))
  if not isinstance(q.scale, np.ndarray) or q.scale.ndim != len(batch) + 2:
    raise ValueError(f"scale must be an array {batch} + (rows, groups), got "
                     f"{getattr(q.scale, 'shape', None)}")
  rows, groups = q.scale.shape[-2:]
  want_groups = 1 if gs is None else -(-c // gs)
  if rows not in (1, r) or groups != want_groups or (rows == 1 and r > 1 and gs is not None):
    raise ValueError(f"scale has shape {q.scale.shape}, expected {batch} + ({r} or 1, "
                     f"{want_groups})")
  expect(q.scale, "scale", np.float32, q.scale.shape)
  _finite(q.scale, "the scales")
  if np.any(q.scale < 0):
    raise ValueError("the scales are negative")
  tail = (c * q.bits) % 32
  if tail and np.size(q.codes) and np.any(q.codes[..., -1] >> np.uint32(tail)):
    raise ValueError(f"codes have bits set past the {c} codes of a row")


def _factor_validate(x, name, k_rows, cols, batch) -> None:
  if isinstance(x, QuantizedMatrix):
    if tuple(x.shape) != (k_rows, cols) or tuple(x.batch_shape) != tuple(batch):
      raise ValueError(f"{name} is a QuantizedMatrix of shape {x.batch_shape} + {x.shape}, "
                       f"expected {tuple(batch)} + {(k_rows, cols)}")
    return
  if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating) \
      and x.dtype != _BF16:
    raise ValueError(f"{name} must be a float array or a QuantizedMatrix, got "
                     f"{getattr(x, 'dtype', type(x).__name__)}")
  expect(x, name, x.dtype, (*batch, k_rows, cols))
  _finite(x, name)


def _low_rank_validate(f: LowRank) -> None:
  m, n = _dims(f.shape, 2)
  u = f.u
  if isinstance(u, QuantizedMatrix):
    batch, k = u.batch_shape, u.shape[0]
  elif isinstance(u, np.ndarray) and u.ndim >= 2:
    batch, k = u.shape[:-2], u.shape[-2]
  else:
    raise ValueError(f"u must be an array (..., k, {m}) or a QuantizedMatrix, got "
                     f"{type(u).__name__}")
  _factor_validate(u, "u", k, m, batch)
  _factor_validate(f.v, "v", k, n, batch)


def _tensor_cut_validate(f: SignedTensorCut) -> None:
  if not isinstance(f.shape, tuple) or not f.shape:
    raise ValueError(f"shape must be a non-empty tuple of ints, got {f.shape!r}")
  dims = _dims(f.shape, len(f.shape))
  if not isinstance(f.bits, tuple) or len(f.bits) != len(dims):
    got = len(f.bits) if isinstance(f.bits, tuple) else "?"
    raise ValueError(f"bits must be a tuple of {len(dims)} arrays (one per axis), got "
                     f"{type(f.bits).__name__} of {got}")
  if not isinstance(f.num_cuts, np.ndarray) or not isinstance(f.c, np.ndarray) \
      or f.c.ndim != f.num_cuts.ndim + 1:
    raise ValueError("c and num_cuts must be arrays of shapes batch + (w,) and batch")
  batch, w = f.num_cuts.shape, f.c.shape[-1]
  expect(f.num_cuts, "num_cuts", np.int32, batch)
  expect(f.c, "c", np.float32, (*batch, w))
  for a, (words, d) in enumerate(zip(f.bits, dims)):
    expect(words, f"bits[{a}]", np.uint32, (*batch, w, _packing.num_words(d)))
    _tail_bits_clear(words, d, f"bits[{a}]")
  if np.any(f.num_cuts < 0) or np.any(f.num_cuts > w):
    raise ValueError(f"num_cuts {_range(f.num_cuts)} outside 0..{w}")
  _finite(f.c, "the scales c")


# ----------------------------------------------------------------------------
# The registrations: a new type is one line here.

_codec.register(SignedCut, "signed_cut", validate=_cuts_validate, trim=_cuts_trim, pad=_cuts_pad)
_codec.register(Sparse, "sparse", validate=_sparse_validate, trim=_sparse_trim, pad=_sparse_pad)
_codec.register(LowRankPart, "lowrank_part", validate=_lowrank_part_validate)
_codec.register(Sum, "sum", validate=_sum_validate)
_codec.register(QuantizedMatrix, "quantized", validate=_quantized_validate)
_codec.register(LowRank, "low_rank", validate=_low_rank_validate)
_codec.register(SignedTensorCut, "signed_tensor_cut", validate=_tensor_cut_validate)
_codec.register(InputScaled, "input_scaled", validate=_input_scaled_validate)
_codec.register(Transposed, "transposed", validate=lambda t: None)
_codec.register(RowBlocks, "row_blocks", validate=_row_blocks_validate)


def describe(node) -> str:
  """A short human description of a stored value from its node alone (no tensor is read)."""
  kind = node.get("type")
  static, fields, slots = node.get("static", {}), node.get("fields", {}), node.get("slots") or {}

  def spec_shape(name):
    v = fields.get(name)
    return v.get("shape") if isinstance(v, dict) and "shape" in v else None

  if kind == "sum":
    parts = (fields.get("parts") or {}).get("tuple") or []
    texts = [describe(p["node"]) for p in parts if isinstance(p, dict) and "node" in p]
    # A sparse part that found no entry is kept (its slots are the budget's), not shown.
    return " + ".join(t for t in texts if t != "0 sparse") or "sum"
  if kind == "row_blocks":
    parts = (fields.get("parts") or {}).get("tuple") or []
    texts = [describe(p["node"]) for p in parts if isinstance(p, dict) and "node" in p]
    return f"{len(texts)} row blocks [" + "; ".join(texts) + "]"
  if kind == "signed_cut":
    c = spec_shape("c")
    return f"cuts {c[-1] if c else '?'}/{slots.get('width', '?')}"
  if kind == "sparse":
    idx = spec_shape("idx") or (fields.get("idx") or {}).get("zeros")
    return f"{idx[-1] if idx else '?'} sparse"
  if kind == "lowrank_part":
    u = spec_shape("u")
    return f"rank {u[-1] if u else '?'} bf16"
  if kind == "quantized":
    gs = static.get("group_size")
    return f"{static.get('bits')}-bit {static.get('grid')} " + ("row" if gs is None else f"g{gs}")
  if kind == "low_rank":
    def factor(name):
      v = fields.get(name) or {}
      if "node" in v:
        return v["node"].get("static", {}), f"{v['node'].get('static', {}).get('bits')}-bit"
      return None, (v.get("dtype") or "?").lower()
    su, bu = factor("u")
    _, bv = factor("v")
    k = su["shape"][0] if su else (spec_shape("u") or ["?", "?"])[-2]
    return f"rank {k} ({bu}, {bv})"
  if kind == "signed_tensor_cut":
    c = spec_shape("c")
    return f"tensor cuts {c[-1] if c else '?'}"
  return str(kind)


def element_count(entry) -> int:
  """Matrix entries a compressed leaf stands for (batch included)."""
  return math.prod(entry.get("batch_shape", [])) * math.prod(entry.get("shape", []))
