"""save/load (safetensors) of every compressed type, expand, truncation at load, corrupt
files, files of earlier format versions, orbax."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import jax_signedcut as sc
from conftest import assert_same_factors, gaussian, heavy, reseal
from jax_signedcut._checkpoint import codec as _codec
from jax_signedcut._checkpoint import structure as _structure
from jax_signedcut._checkpoint import types as _types

DATA = os.path.join(os.path.dirname(__file__), "data")


# One entry per compressed type and layout: a new type is one line here.
MAKERS = {
    "signed_cut": lambda: sc.decompose(gaussian((33, 65), 0), key=jax.random.key(1), width=12,
                                       outliers=0),
    "signed_cut_stacked_early_stop": lambda: sc.decompose(
        gaussian((3, 33, 65), 0), key=jax.random.key(2), width=200, max_error=0.3, outliers=0),
    "sum_cuts_sparse": lambda: sc.decompose(heavy(jax.random.key(3), (40, 70)),
                                            key=jax.random.key(4), rate=0.5),
    "sum_lowrank_cuts_sparse": lambda: sc.decompose(heavy(jax.random.key(5), (40, 70)),
                                                    key=jax.random.key(6), bits_per_weight=4,
                                                    lowrank=3),
    "sum_stacked": lambda: sc.decompose(heavy(jax.random.key(7), (2, 24, 40)),
                                        key=jax.random.key(8), rate=0.5, lowrank=2),
    "sparse": lambda: sc.decompose(heavy(jax.random.key(3), (40, 70)), key=jax.random.key(4),
                                   rate=0.5).part(sc.Sparse),
    "lowrank_part": lambda: sc.decompose(gaussian((20, 30), 0), key=jax.random.key(4), rate=0.5,
                                         lowrank=2, outliers=0).part(sc.LowRankPart),
    "rtn_row": lambda: sc.rtn(gaussian((37, 50), 0), bits=4),
    "rtn_group_uniform": lambda: sc.rtn(gaussian((37, 50), 0), bits=3, group_size=16,
                                        grid="uniform"),
    "rtn_stacked": lambda: sc.rtn(gaussian((2, 3, 17, 33), 0), bits=5),
    "lplr": lambda: sc.lplr(gaussian((40, 30), 0), key=jax.random.key(1), rank=6, bits=(8, 4)),
    "lplr_per_column_stacked": lambda: sc.lplr(gaussian((2, 30, 20), 0), key=jax.random.key(1),
                                               rank=4, bits=(8, 4), scale="per_column"),
    "dsvd": lambda: sc.dsvd(gaussian((40, 30), 0), rank=5, bits=(4, 4)),
    "dsvd_float_factor": lambda: sc.dsvd(gaussian((30, 20), 0), rank=4, bits=(32, 8)),
    "lp_lowrank": lambda: sc.lp_lowrank(gaussian((30, 20), 0), rank=3, p=1.5, iters=3),
    "signed_tensor_cut": lambda: sc.decompose_tensor(gaussian((5, 6, 7), 0), key=jax.random.key(0),
                                                     width=4),
    "input_scaled": lambda: sc.InputScaled(
        jnp.linspace(0.5, 2.0, 40, dtype=jnp.float32),
        sc.decompose(heavy(jax.random.key(3), (40, 70)), key=jax.random.key(4), rate=0.5)),
    "transposed": lambda: sc.Transposed(sc.rtn(gaussian((37, 50), 0), bits=4)),
    "row_blocks": lambda: sc.RowBlocks(
        jnp.asarray(np.random.default_rng(0).permutation(40), jnp.int32),
        (sc.decompose(heavy(jax.random.key(3), (15, 70)), key=jax.random.key(4), rate=0.5),
         sc.InputScaled(jnp.linspace(0.5, 2.0, 25, dtype=jnp.float32),
                        sc.rtn(gaussian((25, 70), 1), bits=4)))),
    "signed_tensor_cut_stacked": lambda: jax.vmap(
        lambda x: sc.decompose_tensor(x, key=jax.random.key(0), width=3))(
            gaussian((2, 5, 6, 7), 0)),
}


@pytest.fixture(scope="module")
def values():
  return {name: make() for name, make in MAKERS.items()}


def test_every_registered_type_is_covered(values):
  covered = {_codec.codec_for(v).name for v in values.values()}
  assert covered == set(_codec.registered())


@pytest.mark.parametrize("name", list(MAKERS))
def test_codec_round_trip(values, name, tmp_path):
  f = values[name]
  path = tmp_path / "f.safetensors"
  sc.save(path, {"w": f})
  back = sc.load(path)["w"]
  assert_same_factors(f, back)
  assert sc.nbytes(back) == sc.nbytes(f) == sc.load_info(path)["leaves"][0]["nbytes"]
  np.testing.assert_array_equal(np.asarray(sc.expand(back, jnp.float32)),
                                np.asarray(sc.reconstruct(f)))
  # Expanding at the stored width (what the CLI does) gives the same matrices.
  from jax_signedcut._checkpoint import reader as _reader  # noqa: PLC0415
  with _reader.Reader(path) as r:
    trimmed = r.leaf(0, full_width=False)
  np.testing.assert_array_equal(np.asarray(sc.expand(trimmed, jnp.float32)),
                                np.asarray(sc.reconstruct(f)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scaled(sc.Compressed):
  """``alpha · base`` per matrix: a type that only this test knows."""

  base: sc.Compressed
  alpha: jax.Array
  note: str = dataclasses.field(default="x", metadata=dict(static=True))

  @property
  def shape(self):
    return self.base.shape

  @property
  def batch_shape(self):
    return self.base.batch_shape

  def _dense(self):
    return self.alpha[..., None, None] * self.base._dense()  # noqa: SLF001

  def stored_bytes(self):
    return self.base.stored_bytes() + 4


def _scaled_validate(x):
  from jax_signedcut._checkpoint.types import expect  # noqa: PLC0415
  expect(x.alpha, "alpha", np.float32, x.base.batch_shape)


def test_a_new_type_is_one_registration(values, tmp_path, monkeypatch):
  monkeypatch.setattr(_codec, "_BY_CLASS", dict(_codec._BY_CLASS))  # noqa: SLF001
  monkeypatch.setattr(_codec, "_BY_NAME", dict(_codec._BY_NAME))  # noqa: SLF001
  _codec.register(Scaled, "scaled_test", validate=_scaled_validate)
  f = {"w": Scaled(values["lplr"], jnp.float32(2.0), note="two"),
       "s": sc.Sum((Scaled(values["rtn_stacked"], jnp.full((2, 3), 0.5)), values["rtn_stacked"]))}
  sc.save(tmp_path / "f.safetensors", f)
  back = sc.load(tmp_path / "f.safetensors")
  assert_same_factors(f, back)
  assert back["w"].note == "two"
  np.testing.assert_array_equal(np.asarray(sc.reconstruct(back["w"])),
                                2 * np.asarray(sc.reconstruct(values["lplr"])))
  # A reader without the registration refuses the file by the type's name.
  del _codec._BY_NAME["scaled_test"]  # noqa: SLF001
  with pytest.raises(sc.CheckpointError, match="unknown compressed type 'scaled_test'"):
    sc.load(tmp_path / "f.safetensors")


@pytest.fixture(scope="module")
def tree(values):
  return {
      "a": values["sum_cuts_sparse"],
      "stack": values["signed_cut_stacked_early_stop"],
      "q": values["rtn_row"],
      "lr": values["lplr"],
      "layers": [{"b": jnp.arange(5.0), "w16": jnp.ones((4, 4), jnp.bfloat16)},
                 {"i": np.arange(6, dtype=np.int32).reshape(2, 3)}],
      "step": np.int64(7),
  }


def test_mixed_tree_round_trip_bit_identical(tree, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, tree, metadata={"note": "hi", "n": [1, 2]})
  back = sc.load(path)
  assert set(back) == {"a", "stack", "q", "lr", "layers", "step"}
  for k in ("a", "stack", "q", "lr"):
    assert_same_factors(tree[k], back[k])
  assert int(tree["a"].part(sc.Sparse).count) > 0
  assert isinstance(back["layers"], list) and len(back["layers"]) == 2
  np.testing.assert_array_equal(back["layers"][0]["b"], np.arange(5.0, dtype=np.float32))
  assert back["layers"][0]["w16"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(back["layers"][1]["i"], tree["layers"][1]["i"])
  assert back["step"].shape == () and back["step"] == 7
  info = sc.load_info(path)
  assert info["user"] == {"note": "hi", "n": [1, 2]} and info["version"] == sc.checkpoint.VERSION
  assert sc.nbytes(back) == sc.nbytes(tree)


def test_only_used_slots_are_stored(tree, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, {"stack": tree["stack"], "a": tree["a"]})
  used = int(np.max(tree["stack"].num_cuts))
  assert used < tree["stack"].width
  sparse = tree["a"].part(sc.Sparse)
  with safe_open(str(path), framework="numpy") as f:
    assert f.get_slice("stack/s_bits").get_shape() == [3, used, 2]
    assert f.get_slice("stack/c").get_shape() == [3, used]
    assert f.get_slice("a/parts/1/idx").get_shape() == [int(sparse.count)]
  entry = sc.load_info(path)["leaves"][1]
  assert entry["value"]["slots"] == {"width": 200} and entry["type"] == "signed_cut"
  assert entry["nbytes"] == sc.nbytes(tree["stack"])


def test_file_is_plain_safetensors(tree, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, tree)
  with safe_open(str(path), framework="numpy") as f:
    meta = f.metadata()
    assert meta["format"] == "jax_signedcut" and meta["format_version"] == "4"
    assert {"layers/0/b", "a/parts/0/s_bits", "q/codes", "lr/u/codes"} <= set(f.keys())


def test_single_leaf_tree(values, tmp_path):
  f = values["rtn_row"]
  sc.save(tmp_path / "one.safetensors", f)
  assert_same_factors(f, sc.load(tmp_path / "one.safetensors"))


def test_expand_every_leaf(tree):
  dense = sc.expand(tree, jnp.float32)
  for k in ("a", "stack", "q", "lr"):
    np.testing.assert_array_equal(np.asarray(dense[k]), np.asarray(sc.reconstruct(tree[k])))
  assert dense["stack"].shape == (3, 33, 65)
  assert sc.expand(tree)["q"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(dense["layers"][0]["b"], np.arange(5.0))
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    sc.expand(tree, jnp.float16)


def test_truncate_at_load_equals_lower_rate(tmp_path):
  a = heavy(jax.random.key(3), (48, 80))
  key = jax.random.key(4)
  q = sc.rtn(a, bits=4)
  sc.save(tmp_path / "half.safetensors", {"w": sc.decompose(a, key=key, rate=0.5), "q": q})
  quarter = sc.decompose(a, key=key, rate=0.25)
  assert int(quarter.part(sc.Sparse).count) > 0
  got = sc.load(tmp_path / "half.safetensors", truncate_rate=0.25)
  assert_same_factors(quarter, got["w"])
  assert_same_factors(q, got["q"])     # other methods' leaves come back as saved
  half = sc.load(tmp_path / "half.safetensors")["w"]
  assert_same_factors(sc.truncate(half, bits_per_weight=3),
                   sc.load(tmp_path / "half.safetensors", truncate_bits=3)["w"])
  with pytest.raises(ValueError, match="at most one"):
    sc.load(tmp_path / "half.safetensors", truncate_rate=0.25, truncate_bits=3)


# ----------------------------------------------------------------------------
# Files of format versions 1 and 2, written by the release that wrote them
# (tests/data/make_legacy_checkpoints.py).


@pytest.fixture(scope="module")
def expected():
  with np.load(os.path.join(DATA, "legacy_expected.npz")) as z:
    return {k: z[k] for k in z.files}


def _old_fields(expected, name):
  prefix = name + "."
  return {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix)}


def _oracle(old, shape):
  """The old release's A ≈ S·diag(c)·Tᵀ + U·Vᵀ + sparse, in numpy."""
  m, n = shape
  bits = lambda w, d: 1 - 2 * ((w[..., :, None] >> np.arange(32, dtype=np.uint32))  # noqa: E731
                               & 1).reshape(*w.shape[:-1], -1)[..., :d].astype(np.float64)
  s, t = bits(old["s_bits"], m), bits(old["t_bits"], n)
  out = np.einsum("...km,...k,...kn->...mn", s, old["c"].astype(np.float64), t)
  if "lr_u" in old:
    out = out + np.asarray(old["lr_u"], np.float64) @ np.swapaxes(
        np.asarray(old["lr_v"], np.float64), -1, -2)
  if "sparse_idx" in old:
    flat = out.reshape(-1, m * n)
    idx = old["sparse_idx"].reshape(flat.shape[0], -1)
    val = old["sparse_val"].reshape(idx.shape)
    for b in range(flat.shape[0]):
      np.add.at(flat[b], idx[b], val[b])
    out = flat.reshape(out.shape)
  return out


LEGACY = [
    # file, leaf path, the parts it loads as
    ("v1", "cuts", None),
    ("v1", "layer/0/w", (sc.SignedCut, sc.Sparse)),
    ("v1", "empty_sparse", (sc.SignedCut, sc.Sparse)),
    ("v2", "pos", (sc.LowRankPart, sc.SignedCut, sc.Sparse)),
    ("v2", "lr", (sc.LowRankPart, sc.SignedCut)),
]


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[int(k)] if isinstance(tree, list) else tree[k]
  return tree


@pytest.mark.parametrize("version,path,parts", LEGACY)
def test_legacy_file_loads_as_current_types(expected, version, path, parts):
  file = os.path.join(DATA, f"legacy_{version}.safetensors")
  with safe_open(file, framework="numpy") as f:
    assert f.metadata()["format_version"] == version[1:]
  f = _get(sc.load(file), path)
  old = _old_fields(expected, f"{version}:{path}")
  if parts is None:
    assert isinstance(f, sc.SignedCut)
    cuts = f
  else:
    assert isinstance(f, sc.Sum) and tuple(type(p) for p in f.parts) == parts
    cuts = f.part(sc.SignedCut)
  for field in ("s_bits", "t_bits", "c", "num_cuts"):
    np.testing.assert_array_equal(np.asarray(getattr(cuts, field)), old[field], err_msg=field)
    assert getattr(cuts, field).dtype == old[field].dtype
  sparse = f.part(sc.Sparse) if isinstance(f, sc.Sum) else None
  if sparse is not None:
    np.testing.assert_array_equal(np.asarray(sparse.idx), old["sparse_idx"])
    np.testing.assert_array_equal(np.asarray(sparse.val), old["sparse_val"])
    np.testing.assert_array_equal(np.asarray(sparse.count), old["num_sparse"])
  lowrank = f.part(sc.LowRankPart) if isinstance(f, sc.Sum) else None
  if lowrank is not None:
    assert lowrank.u.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(lowrank.u, np.float32), old["lr_u"])
    np.testing.assert_array_equal(np.asarray(lowrank.v, np.float32), old["lr_v"])
  np.testing.assert_allclose(np.asarray(sc.reconstruct(f)), _oracle(old, f.shape),
                             rtol=0, atol=1e-4)


def test_legacy_files_other_leaves_and_metadata(expected):
  v1 = sc.load(os.path.join(DATA, "legacy_v1.safetensors"))
  np.testing.assert_array_equal(np.asarray(v1["layer"][0]["b"], np.float32),
                                expected["v1:layer/0/b.array"])
  assert v1["layer"][0]["b"].dtype == jnp.bfloat16
  assert v1["step"] == expected["v1:step.array"]
  assert int(v1["empty_sparse"].part(sc.Sparse).count) == 0
  info = sc.load_info(os.path.join(DATA, "legacy_v2.safetensors"))
  assert info["version"] == 2 and info["user"] == {"fixture": "v2"}
  pos = next(e for e in info["leaves"] if e["path"] == "pos")
  assert pos["kind"] == "compressed" and pos["type"] == "sum"


def test_legacy_file_resaves_as_current_version(tmp_path):
  old = sc.load(os.path.join(DATA, "legacy_v2.safetensors"))
  sc.save(tmp_path / "new.safetensors", old)
  assert_same_factors(old, sc.load(tmp_path / "new.safetensors"))
  # truncation at load works on an old file too
  got = sc.load(os.path.join(DATA, "legacy_v2.safetensors"), truncate_bits=3)
  assert_same_factors(sc.truncate(old["pos"], bits_per_weight=3), got["pos"])


def test_legacy_corruption_names_the_file(tmp_path):
  path = tmp_path / "old.safetensors"
  shutil.copy(os.path.join(DATA, "legacy_v1.safetensors"), path)
  data = bytearray(path.read_bytes())
  data[-3] ^= 0x10
  path.write_bytes(bytes(data))
  with pytest.raises(sc.CheckpointError, match=f"{path}.*corrupt .CRC-32"):
    sc.load(path)


def test_legacy_inconsistent_entry(tmp_path):
  path = tmp_path / "old.safetensors"
  shutil.copy(os.path.join(DATA, "legacy_v2.safetensors"), path)
  rewrite(path, body=lambda b: entry(b, "pos").pop("lowrank"))
  with pytest.raises(ValueError, match=f"{path}.*low-rank tensors present but lowrank is null"):
    sc.load(path)
  shutil.copy(os.path.join(DATA, "legacy_v2.safetensors"), path)
  rewrite(path, body=lambda b: entry(b, "pos").update(lowrank=3))
  with pytest.raises(ValueError, match="has shape .* the metadata says"):
    sc.load(path)


# ----------------------------------------------------------------------------
# Corrupt, truncated, inconsistent and newer files


@pytest.fixture
def saved(tree, values, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, {"a": tree["a"], "stack": tree["stack"], "q": tree["q"], "lr": tree["lr"],
                 "t": values["signed_tensor_cut"], "p": values["sum_lowrank_cuts_sparse"],
                 "b": jnp.arange(5.0)})
  return path


def rewrite(path, *, tensors=None, body=None, meta=None):
  """Rewrites a saved file after editing its tensors/metadata (CRCs recomputed)."""
  with safe_open(str(path), framework="numpy") as f:
    ts = {k: f.get_tensor(k) for k in f.keys()}
    md = dict(f.metadata())
  b = json.loads(md["jax_signedcut"])
  if tensors:
    tensors(ts)
  if body:
    body(b)
  b["crc32"] = {k: zlib.crc32(np.ascontiguousarray(v).tobytes()) for k, v in ts.items()}
  md["jax_signedcut"] = json.dumps(b)
  if meta:
    meta(md)
  save_file(ts, str(path), metadata=md)
  if "header_crc32" in md:
    path.write_bytes(reseal(path.read_bytes()))


def entry(b, path):
  return next(e for e in b["leaves"] if e["path"] == path)


def node(b, path, *parts):
  """The value node of leaf ``path``, or of its nested parts (Sum.parts indices / field names)."""
  n = entry(b, path)["value"]
  for p in parts:
    n = n["fields"]["parts"]["tuple"][p]["node"] if isinstance(p, int) else n["fields"][p]["node"]
  return n


def test_row_blocks_file_refuses_a_repeated_row(values, tmp_path):
  path = tmp_path / "f.safetensors"
  sc.save(path, {"w": values["row_blocks"]})
  with safe_open(str(path), framework="numpy") as f:
    node_ = json.loads(f.metadata()["jax_signedcut"])["leaves"][0]["value"]
  assert _types.describe(node_) == "2 row blocks [cuts 36/37 + 5 sparse; input_scaled]"

  def repeat(ts):
    _set(ts, "w/perm", lambda x: np.concatenate([x[:1], x[:-1]]))
  rewrite(path, tensors=repeat)
  with pytest.raises(sc.CheckpointError, match="perm is not a permutation of the 40 rows"):
    sc.load(path)


def test_truncated_file(saved):
  data = saved.read_bytes()
  for cut in (len(data) - 7, len(data) // 2, 100, 3, 0):
    saved.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=f"{saved}.*truncated or corrupt"):
      sc.load(saved)


def test_flipped_byte_is_caught_by_crc(saved):
  data = bytearray(saved.read_bytes())
  data[-3] ^= 0x10
  saved.write_bytes(bytes(data))
  with pytest.raises(sc.CheckpointError, match=f"{saved}.*corrupt .CRC-32"):
    sc.load(saved)


def test_garbage_header(saved):
  data = bytearray(saved.read_bytes())
  data[8:12] = b"}}}}"
  saved.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=str(saved)):
    sc.load(saved)


def test_newer_version(saved):
  rewrite(saved, meta=lambda md: md.update(format_version="5"))
  with pytest.raises(ValueError, match="format version 5 is newer"):
    sc.load(saved)


def test_not_our_format(tmp_path):
  p = tmp_path / "plain.safetensors"
  save_file({"w": np.ones((2, 2), np.float32)}, str(p))
  with pytest.raises(ValueError, match="not a jax_signedcut checkpoint"):
    sc.load(p)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    sc.load(tmp_path / "nope.safetensors")


def _set(ts, name, fn):
  ts[name] = fn(ts[name].copy())


def _idx_out_of_range(ts):
  def f(x):
    x[..., 0] = 40 * 70
    return x
  _set(ts, "a/parts/1/idx", f)


def _swap_idx(ts):
  _set(ts, "a/parts/1/idx", lambda x: x[..., ::-1].copy())


@pytest.mark.parametrize("edit,match", [
    # metadata that disagrees with the tensors
    (dict(body=lambda b: node(b, "a", 0)["static"].update(shape=[70, 40])),
     "s_bits has shape .*, expected"),
    (dict(body=lambda b: node(b, "stack").update(slots={"width": 1})), "width must be an int in 62..2147483647"),
    (dict(body=lambda b: node(b, "a", 1)["fields"]["idx"].update(shape=[3])),
     "has shape .* the metadata says"),
    (dict(body=lambda b: node(b, "q")["static"].update(bits=40)), "bits must be in"),
    (dict(body=lambda b: node(b, "q")["static"].update(bits=3)), "codes has shape"),
    (dict(body=lambda b: node(b, "lr", "u")["static"].update(shape=[7, 40])),
     "low_rank.u: quantized: codes has shape"),
    (dict(body=lambda b: node(b, "q").update(type="nonesuch")), "unknown compressed type"),
    (dict(body=lambda b: node(b, "q").update(version=99)), "layout version 99"),
    (dict(body=lambda b: entry(b, "q").update(batch_shape=[2])), "the entry says"),
    # tensors that break a type's invariants
    (dict(tensors=lambda ts: _set(ts, "stack/num_cuts", lambda x: x + 500)),
     "num_cuts .* outside"),
    (dict(tensors=_idx_out_of_range), "sparse indices out of range"),
    (dict(tensors=_swap_idx), "not strictly ascending"),
    (dict(tensors=lambda ts: _set(ts, "stack/c", lambda x: x * np.nan)), "NaN"),
    (dict(tensors=lambda ts: _set(ts, "q/scale", lambda x: -x)), "negative"),
    (dict(tensors=lambda ts: _set(ts, "a/parts/0/t_bits", lambda x: x | np.uint32(1 << 31))),
     "bits set past"),
    (dict(tensors=lambda ts: _set(ts, "p/parts/0/u", lambda x: np.full_like(x, np.nan))),
     "lowrank_part: the low-rank factor u contains NaN"),
    (dict(body=lambda b: node(b, "p", 0)["static"].update(shape=[40, 71])), "v has shape"),
    (dict(body=lambda b: node(b, "t")["static"].update(shape=[5, 6, 7, 8])),
     "bits must be a tuple of 4 arrays"),
    (dict(tensors=lambda ts: _set(ts, "t/bits/1", lambda x: x | np.uint32(1 << 31))),
     r"bits\[1\] has bits set past"),
    # tensors and entries that do not match up
    (dict(tensors=lambda ts: ts.update({"extra": np.ones(2, np.float32)})), "not described"),
    (dict(tensors=lambda ts: ts.pop("b")), "missing from the file"),
    (dict(tensors=lambda ts: ts.update({"b": ts["b"].astype(np.float64)})), "dtype float64"),
    (dict(body=lambda b: b.update(leaves=[{"kind": "weird"}])), "malformed"),
])
def test_inconsistent_file(saved, edit, match):
  rewrite(saved, **edit)
  with pytest.raises(ValueError, match=match) as e:
    sc.load(saved)
  assert str(saved) in str(e.value)
  assert isinstance(e.value, sc.CheckpointError)


def test_unflatten_rejects_conflicts():
  with pytest.raises(ValueError, match="both a leaf and a container"):
    _structure.unflatten([([["d", "a"]], 1), ([["d", "a"], ["d", "b"]], 2)])
  with pytest.raises(ValueError, match="mixes sequence and mapping"):
    _structure.unflatten([([["d", "a"], ["i", 0]], 1), ([["d", "a"], ["d", "x"]], 2)])


def test_save_rejects_traced_bad_metadata_and_unregistered_types(tmp_path, values):
  f = values["rtn_row"]
  with pytest.raises(ValueError, match="JSON"):
    sc.save(tmp_path / "x.safetensors", f, metadata={"x": object()})

  def inside(g):
    sc.save(tmp_path / "y.safetensors", g)
    return g.scale
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(inside)(f)

  class Unknown(sc.QuantizedMatrix):
    pass
  odd = Unknown(codes=f.codes, scale=f.scale, shape=f.shape, bits=f.bits, grid=f.grid)
  with pytest.raises(TypeError, match="no checkpoint codec is registered for Unknown"):
    sc.save(tmp_path / "z.safetensors", {"w": odd})
  assert not list(tmp_path.iterdir())    # nothing half-written


def test_key_paths_agree_with_rules():
  from jax_signedcut._core import tree as _tree  # noqa: PLC0415

  t = {"params": [{"w": 1}], "v": nnx.Param(jnp.ones(2))}
  flat = jax.tree_util.tree_flatten_with_path(t)[0]
  got = [(c, _tree.leaf_path(kp)) for (c, _), (kp, _) in zip(_structure.flatten(t), flat)]
  assert [p for _, p in got] == ["params/0/w", "v"]
  assert all("/".join(str(x[1]) for x in c) == p for c, p in got)


# ----------------------------------------------------------------------------
# Orbax


def test_orbax_every_type(values, tmp_path):
  sub = {**values, "b": jnp.arange(5.0)}
  sc.save_orbax(tmp_path / "ck", sub)
  back = sc.load_orbax(tmp_path / "ck")
  for k, v in values.items():
    assert_same_factors(v, back[k])
  np.testing.assert_array_equal(back["b"], np.arange(5.0))
  like = sc.load_orbax(tmp_path / "ck", like=sub)
  for k, v in values.items():
    assert_same_factors(v, like[k])


def test_orbax_legacy_signed_cut_entry(tmp_path):
  # What earlier releases wrote for a signed cut with sparse and low-rank fields.
  f = sc.decompose(heavy(jax.random.key(5), (40, 70)), key=jax.random.key(6),
                   bits_per_weight=4, lowrank=3)
  lr, cuts, sp = f.parts
  old = {"s_bits": cuts.s_bits, "t_bits": cuts.t_bits, "c": cuts.c, "num_cuts": cuts.num_cuts,
         "sparse_idx": sp.idx, "sparse_val": sp.val, "num_sparse": sp.count,
         "lr_u": lr.u, "lr_v": lr.v, "shape": np.asarray([40, 70], np.int64)}
  import orbax.checkpoint as ocp  # noqa: PLC0415
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(tmp_path / "old"), {"w": {"__signed_cut__": old}})
    ckptr.wait_until_finished()
  assert_same_factors(f, sc.load_orbax(tmp_path / "old")["w"])


def test_orbax_linen_params_round_trip(tmp_path):
  import flax.linen as nn  # noqa: PLC0415

  mlp = nn.Sequential([nn.Dense(24), nn.relu, nn.Dense(8)])
  params = mlp.init(jax.random.key(0), jnp.ones((1, 16)))
  sc.save_orbax(tmp_path / "linen", params)
  back = sc.load_orbax(tmp_path / "linen")
  jax.tree.map(np.testing.assert_array_equal, params, back)
  x = jnp.ones((2, 16))
  np.testing.assert_array_equal(mlp.apply(params, x), mlp.apply(back, x))


def test_load_orbax_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    sc.load_orbax(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="cannot restore"):
    sc.load_orbax(tmp_path / "empty")


@pytest.mark.parametrize("method", ["signed_cut", "rtn"])
def test_orbax_nnx_state_round_trip(tmp_path, method):
  from jax_signedcut.nnx import swap_linears  # noqa: PLC0415

  def model(seed):
    m = nnx.Sequential(nnx.Linear(32, 48, rngs=nnx.Rngs(seed)), nnx.relu,
                       nnx.Linear(48, 16, rngs=nnx.Rngs(seed + 1)))
    swap_linears(m, sc.decompose(nnx.state(m, nnx.Param), key=jax.random.key(seed),
                                 bits_per_weight=8, method=method))
    return m

  m, m2 = model(0), model(5)
  x = jax.random.normal(jax.random.key(9), (3, 32))
  assert not np.array_equal(m(x), m2(x))
  sc.save_orbax(tmp_path / "nnx", nnx.state(m))
  nnx.update(m2, sc.load_orbax(tmp_path / "nnx", like=nnx.state(m2)))
  np.testing.assert_array_equal(m(x), m2(x))
  # and through a safetensors file
  sc.save(tmp_path / "m.safetensors", nnx.state(m))
  m3 = model(7)
  back = sc.load(tmp_path / "m.safetensors")
  nnx.update(m3, back)
  np.testing.assert_array_equal(m(x), m3(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_save_refuses_non_finite_fields(values, tmp_path, bad):
  f = values["signed_cut"]
  c = np.asarray(f.c).copy()
  c[0] = bad
  tree = {"layer": {"w": dataclasses.replace(f, c=jnp.asarray(c))}}
  with pytest.raises(ValueError, match=r"leaf 'layer/w': layer/w/c holds NaN or Inf"):
    sc.save(tmp_path / "f.safetensors", tree)
  assert not os.listdir(tmp_path)   # nothing written, no temporary left
  q = values["rtn_row"]
  scale = np.asarray(q.scale).copy()
  scale[1, 0] = bad
  with pytest.raises(ValueError, match=r"leaf 'q': q/scale holds NaN or Inf"):
    sc.save(tmp_path / "f.safetensors", {"q": dataclasses.replace(q, scale=jnp.asarray(scale))})


def test_tree_without_leaves_round_trips(tmp_path):
  for tree in ({}, {"a": {}}, [], None):
    sc.save(tmp_path / "e.safetensors", tree)
    assert sc.load(tmp_path / "e.safetensors") == {}
    assert sc.load_info(tmp_path / "e.safetensors")["leaves"] == []


def test_path_must_be_a_path():
  for bad in (None, 3, b"f.safetensors"):
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
      sc.load(bad)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
      sc.save(bad, {"a": np.ones(2, np.float32)})
