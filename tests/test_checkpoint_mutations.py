"""A checkpoint mutator: every mutant of a small multi-type file is refused naming the file, or
loads bit-identical to the original. No other outcome (a crash, a value that differs, memory far
beyond the file's size) is allowed.

Mutants (generated from one seed, so a failure reproduces): bit flips in the header and in the
data, truncations, and edits of the header's JSON (tensor names, shapes, dtypes, offsets, format
versions, CRC entries, leaf keys, static shapes, slot widths, nbytes, type names and versions).
The edits are tried twice: as they are (the header checksum of format version 4 must catch them)
and resealed with a recomputed checksum (what a file of version 3 without one, or a writer that
edits on purpose, gives: the structural checks behind the checksum must catch those that do not
describe the same value). Edits that describe another valid value (a renamed key, a slot width
within bounds) can only be caught by the checksum, so they are not resealed.
"""

from __future__ import annotations

import copy
import json
import pathlib
import struct
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as sc
from conftest import gaussian, reseal
from jax_signedcut._checkpoint import format as _format

SEED = 20261201
HEADER_FLIPS = 450
DATA_FLIPS = 250
TRUNCATIONS = 120


@pytest.fixture(scope="module")
def original(tmp_path_factory):
  # One decomposition (compiling is most of this file's time): the Sum reuses its cuts with
  # a sparse part made by hand (3 of 5 slots used, as the outlier split leaves them).
  cuts = sc.decompose(gaussian((20, 33), 0), key=jax.random.key(1), width=6, outliers=0)
  sparse = sc.Sparse(idx=jnp.array([3, 40, 600, 0, 0], jnp.int32),
                     val=jnp.array([9.5, -7.0, 12.25, 0, 0], jnp.float32),
                     count=jnp.int32(3), shape=(20, 33))
  tree = {
      "cuts": cuts,
      "sum": sc.Sum((cuts, sparse)),
      "layers": [{"q": sc.rtn(gaussian((12, 40), 2), bits=4)},
                 {"lr": sc.dsvd(gaussian((24, 16), 3), rank=3, bits=(8, 4))}],
      "bias": jnp.arange(5.0),
  }
  assert isinstance(tree["sum"], sc.Sum) and tree["sum"].part(sc.Sparse) is not None
  path = tmp_path_factory.mktemp("mut") / "orig.safetensors"
  sc.save(path, tree, metadata={"note": "mutants"})
  return path.read_bytes(), sc.load(path)


def split(data: bytes):
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  meta = header.pop("__metadata__")
  return n, header, meta, json.loads(meta[_format.FORMAT])


def join(header, meta, body, data_part: bytes) -> bytes:
  meta = dict(meta, **{_format.FORMAT: json.dumps(body, separators=(",", ":"))})
  blob = json.dumps(dict(header, __metadata__=meta), separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  return struct.pack("<Q", len(blob)) + blob + data_part


def flat(tree):
  return jax.tree_util.tree_flatten_with_path(tree)


def same(a, b) -> bool:
  """The same tree: paths, node types, static fields, dtypes, shapes and bits."""
  (la, ta), (lb, tb) = flat(a), flat(b)
  if ta != tb or len(la) != len(lb):
    return False
  for (pa, xa), (pb, xb) in zip(la, lb):
    xa, xb = np.asarray(xa), np.asarray(xb)
    if pa != pb or xa.dtype != xb.dtype or xa.shape != xb.shape or xa.tobytes() != xb.tobytes():
      return False
  return True


# ----------------------------------------------------------------------------
# Header edits: (name, edit(header, meta, body), reseal?) — edit mutates in place.


def _leaf(body, path):
  return next(e for e in body["leaves"] if e["path"] == path)


def _node(body, path, *parts):
  n = _leaf(body, path)["value"]
  for p in parts:
    n = n["fields"]["parts"]["tuple"][p]["node"] if isinstance(p, int) else n["fields"][p]["node"]
  return n


def _first(header, pred=lambda e: True):
  return next(k for k in sorted(header) if pred(header[k]))


def _edits():
  """Every edit kind, with the values it is tried with."""
  out = []

  def add(name, fn, resealed=True):
    out.append((name, fn, resealed))

  huge = [2**63, 2**64 + 3, 10**8, -1, 0, 1.5, "7", None, True]
  # The tensor table.
  for v in ([], [1], [3, 3], [2**63], [2**32, 2**32], [-4], "x", [1.0]):
    add(f"table shape {v}", lambda h, m, b, v=v: h[_first(h)].update(shape=v))
  for v in ([0, 2**63], [2**63, 2**63 + 4], [-8, 0], [4, 0], [0], "0", [0, 1.5]):
    add(f"table offsets {v}", lambda h, m, b, v=v: h[_first(h)].update(data_offsets=v))
  for d in (4, -4, 1):
    add(f"table offsets shifted {d}", lambda h, m, b, d=d: h[_first(
        h, lambda e: e["data_offsets"][0] > 0)]["data_offsets"].__setitem__(0, h[_first(
            h, lambda e: e["data_offsets"][0] > 0)]["data_offsets"][0] + d))
  for code in ("I32", "F16", "U8", "F64", "BF16", "XX", "F8_E4M3", 3):
    add(f"table dtype {code}", lambda h, m, b, c=code: h[_first(h)].update(dtype=c))
  add("table rename", lambda h, m, b: h.__setitem__("zz", h.pop(_first(h))))
  add("table drop", lambda h, m, b: h.pop(_first(h)))
  add("table extra key", lambda h, m, b: h[_first(h)].update(extra=1))
  add("table swap offsets", lambda h, m, b: _swap_offsets(h))
  # Format versions and the checksum itself.
  for v in ("1", "2", "3", "5", "0", "", "x", "4 ", "04", "99999999999999999999"):
    add(f"format_version {v!r}", lambda h, m, b, v=v: m.update(format_version=v))
  add("no format", lambda h, m, b: m.pop("format"))
  add("metadata not json", lambda h, m, b: b.clear() or b.update(leaves="oops"))
  for v in (2, 5, "4", None):
    add(f"body version {v!r}", lambda h, m, b, v=v: b.update(version=v))
  add("checksum dropped", lambda h, m, b: m.pop(_format.HEADER_CRC), resealed=False)
  add("checksum changed", lambda h, m, b: m.update({_format.HEADER_CRC: "0badc0de"}),
      resealed=False)
  # CRC entries.
  add("crc dropped", lambda h, m, b: b["crc32"].pop(sorted(b["crc32"])[0]))
  add("crc of sum dropped", lambda h, m, b: b["crc32"].pop("sum/parts/1/idx"))
  add("crc table empty", lambda h, m, b: b["crc32"].clear())
  add("crc value +1", lambda h, m, b: b["crc32"].update({"cuts/c": b["crc32"]["cuts/c"] ^ 1}))
  for v in (-1, 2**32, 2**63, "123", None, 1.0):
    add(f"crc value {v!r}", lambda h, m, b, v=v: b["crc32"].update({"cuts/c": v}))
  add("crc extra", lambda h, m, b: b["crc32"].update(ghost=0))
  # Leaf entries: keys, paths, kinds, shapes.
  add("key renamed", lambda h, m, b: _leaf(b, "cuts").update(key=[["d", "cutz"]], path="cutz"),
      resealed=False)
  add("key only renamed", lambda h, m, b: _leaf(b, "cuts").update(key=[["d", "cutz"]]))
  add("path only renamed", lambda h, m, b: _leaf(b, "cuts").update(path="cutz"))
  add("list index", lambda h, m, b: _leaf(b, "layers/0/q").update(
      key=[["i", 10**9], ["d", "q"]], path=f"{10**9}/q"))
  add("key kind", lambda h, m, b: _leaf(b, "layers/0/q")["key"][1].__setitem__(0, "d"))
  add("leaf dropped", lambda h, m, b: b["leaves"].pop(0))
  add("leaf duplicated", lambda h, m, b: b["leaves"].append(copy.deepcopy(b["leaves"][0])))
  add("kind", lambda h, m, b: _leaf(b, "cuts").update(kind="array"))
  add("legacy kind", lambda h, m, b: _leaf(b, "cuts").update(kind="signed_cut"))
  for f, values in (("shape", ([20, 34], [21, 33], [2], [], [2**63, 1], "x")),
                    ("batch_shape", ([1], [2], [2**63], [20], "x"))):
    for v in values:
      add(f"entry {f} {v}", lambda h, m, b, f=f, v=v: _leaf(b, "cuts").update({f: v}))
  for v in (0, 1, 10**12, -5, "9"):
    add(f"nbytes {v}", lambda h, m, b, v=v: _leaf(b, "sum").update(nbytes=v))
  add("array dtype", lambda h, m, b: _leaf(b, "bias").update(dtype="float64"))
  add("array shape", lambda h, m, b: _leaf(b, "bias").update(shape=[6]))
  add("array tensor", lambda h, m, b: _leaf(b, "bias").update(tensor="cuts/c"))
  # Value nodes: static fields, slots, types, versions, tensor descriptions.
  for v in ([20, 34], [20, 32], [21, 33], [2**63, 33], [0, 33], [20], None):
    add(f"cuts static shape {v}", lambda h, m, b, v=v: _node(b, "cuts")["static"].update(shape=v))
  for v in huge:
    add(f"cuts width {v!r}", lambda h, m, b, v=v: _node(b, "cuts").update(slots={"width": v}))
    add(f"sparse capacity {v!r}",
        lambda h, m, b, v=v: _node(b, "sum", 1).update(slots={"capacity": v}))
  add("cuts width +1", lambda h, m, b: _node(b, "cuts")["slots"].update(
      width=_node(b, "cuts")["slots"]["width"] + 1), resealed=False)
  add("sparse capacity +1", lambda h, m, b: _node(b, "sum", 1)["slots"].update(
      capacity=_node(b, "sum", 1)["slots"]["capacity"] + 1), resealed=False)
  add("slots dropped", lambda h, m, b: _node(b, "cuts").pop("slots"), resealed=False)
  for v in (2, 3, 16, 40, 0, 2**63):
    add(f"rtn bits {v}", lambda h, m, b, v=v: _node(b, "layers/0/q")["static"].update(bits=v))
  for v in (8, 7, 0):
    add(f"rtn group {v}", lambda h, m, b, v=v: _node(b, "layers/0/q")["static"].update(
        group_size=v))
  add("rtn grid", lambda h, m, b: _node(b, "layers/0/q")["static"].update(grid="nf4"))
  for v in ([3, 23], [4, 24], [3, 25]):
    add(f"lplr u shape {v}", lambda h, m, b, v=v: _node(b, "layers/1/lr", "u")["static"].update(
        shape=v))
  for t in ("quantized", "sum", "nonesuch", None, 3):
    add(f"type {t!r}", lambda h, m, b, t=t: _node(b, "cuts").update(type=t))
  for v in (0, 2, 99, "1", True, None):
    add(f"node version {v!r}", lambda h, m, b, v=v: _node(b, "sum", 1).update(version=v))
  add("field dropped", lambda h, m, b: _node(b, "cuts")["fields"].pop("c"))
  add("field null", lambda h, m, b: _node(b, "cuts")["fields"].update(c=None))
  add("field zeros", lambda h, m, b: _node(b, "cuts")["fields"].update(
      c={"zeros": [10**9], "dtype": "F32"}))
  add("field zeros empty", lambda h, m, b: _node(b, "sum", 1)["fields"].update(
      idx={"zeros": [0], "dtype": "I32"}))
  add("fields swapped", lambda h, m, b: _swap_fields(_node(b, "cuts")))
  add("parts dropped", lambda h, m, b: _node(b, "sum")["fields"]["parts"]["tuple"].pop())
  add("parts nested", lambda h, m, b: _node(b, "sum")["fields"]["parts"].update(
      tuple=[{"tuple": _node(b, "sum")["fields"]["parts"]["tuple"]}]))
  for v in ([2**63], [1, 1], "x", [], [-1]):
    add(f"spec shape {v}", lambda h, m, b, v=v: _node(b, "cuts")["fields"]["c"].update(shape=v))
  for v in ("I32", "XX", "BF16"):
    add(f"spec dtype {v}", lambda h, m, b, v=v: _node(b, "cuts")["fields"]["c"].update(dtype=v))
  add("spec tensor", lambda h, m, b: _node(b, "cuts")["fields"]["c"].update(tensor="cuts/s_bits"))
  # What does not change the value: resealed, these must load as the original.
  add("user metadata", lambda h, m, b: b["user"].update(note="edited"))
  add("extra metadata", lambda h, m, b: m.update(comment="hi"))
  return out


def _swap_offsets(h):
  a, b = sorted(h)[:2]
  h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


def _swap_fields(n):
  f = n["fields"]
  f["s_bits"], f["t_bits"] = f["t_bits"], f["s_bits"]


# ----------------------------------------------------------------------------


def mutants(base: bytes):
  """``(label, bytes)`` of every mutant, deterministic in SEED."""
  rng = np.random.default_rng(SEED)
  n, header, meta, body = split(base)
  end = 8 + n
  data_part = base[end:]
  for _ in range(HEADER_FLIPS):
    i, bit = int(rng.integers(0, end)), int(rng.integers(0, 8))
    b = bytearray(base)
    b[i] ^= 1 << bit
    yield f"header flip {i}:{bit}", bytes(b)
  for _ in range(DATA_FLIPS):
    i, bit = int(rng.integers(end, len(base))), int(rng.integers(0, 8))
    b = bytearray(base)
    b[i] ^= 1 << bit
    yield f"data flip {i}:{bit}", bytes(b)
  cuts = {0, 1, 7, 8, 9, end - 1, end, end + 1, len(base) - 1}
  cuts |= {int(x) for x in rng.integers(0, len(base), TRUNCATIONS - len(cuts))}
  for c in sorted(cuts):
    yield f"truncated to {c}", base[:c]
  yield "appended byte", base + b"\0"
  for name, edit, resealed in _edits():
    h, m, b = copy.deepcopy(header), dict(meta), copy.deepcopy(body)
    edit(h, m, b)
    assert json.dumps([h, m, b]) != json.dumps([header, meta, body]), f"{name}: no change"
    data = join(h, m, b, data_part)
    yield f"edit {name}", data
    if resealed:
      yield f"resealed edit {name}", reseal(data)


def test_every_mutant_is_refused_or_identical(original, tmp_path):
  base, want = original
  path = tmp_path / "m.safetensors"
  counts = {"refused": 0}
  bad, identical = [], []
  tracemalloc.start()
  try:
    for label, data in mutants(base):
      path.write_bytes(data)
      try:
        got = sc.load(path)
      except sc.CheckpointError as e:
        counts["refused"] += 1
        if str(path) not in str(e):
          bad.append((label, f"error does not name the file: {e}"))
        continue
      except Exception as e:  # noqa: BLE001  (any other error is a crash of the reader)
        bad.append((label, f"crash: {type(e).__name__}: {e}"))
        continue
      if same(got, want):
        identical.append(label)
      else:
        bad.append((label, "loaded but different"))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  total = counts["refused"] + len(identical) + len(bad)
  assert total >= 1000, (total, counts)
  assert not bad, (len(bad), bad[:20])
  # Memory stays near the file's own size whatever its header claims (a few KiB file here:
  # the bound is loose for the reader's own bookkeeping, far below what a claimed width of
  # 10**8 or a shape of 2**63 would take).
  assert peak < 64 * len(base) + (8 << 20), peak
  # Only the edits that leave the tree as it was load (resealed: they pass the checksum).
  assert sorted(identical) == ["resealed edit extra metadata", "resealed edit user metadata"], \
      identical


def test_legacy_files_structural_edits_are_refused(tmp_path):
  """Files of format versions 1 and 2 have no header checksum: structural edits still fail."""
  data_dir = pathlib.Path(__file__).parent / "data"
  path = tmp_path / "old.safetensors"
  for version in (1, 2):
    base = (data_dir / f"legacy_v{version}.safetensors").read_bytes()
    n, header, meta, body = split(base)
    edits = [
        lambda h, m, b: b["crc32"].pop(sorted(b["crc32"])[0]),
        lambda h, m, b: b["crc32"].update(ghost=1),
        lambda h, m, b: h[_first(h)].update(shape=[2**63]),
        lambda h, m, b: h[_first(h)].update(data_offsets=[0, 2**63]),
        lambda h, m, b: _swap_offsets(h),
        lambda h, m, b: b["leaves"][0].update(path="elsewhere"),
        lambda h, m, b: next(e for e in b["leaves"] if e["kind"] == "signed_cut").update(
            width=10**8),
        lambda h, m, b: next(e for e in b["leaves"] if e["kind"] == "signed_cut").update(
            stored_width=2**63),
        lambda h, m, b: m.update(format_version="9"),
    ]
    for edit in edits:
      h, m, b = copy.deepcopy(header), dict(meta), copy.deepcopy(body)
      edit(h, m, b)
      path.write_bytes(join(h, m, b, base[8 + n:]))
      with pytest.raises(sc.CheckpointError, match=str(path)):
        sc.load(path)
