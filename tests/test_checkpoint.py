"""save/load (safetensors), expand, truncation at load, corruption checks, orbax."""

from __future__ import annotations

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import jax_signedcut as sc
from jax_signedcut import _checkpoint

FIELDS = ("s_bits", "t_bits", "c", "num_cuts", "sparse_idx", "sparse_val", "num_sparse")


def assert_same_factors(f, g):
  assert isinstance(g, sc.SignedCut)
  assert f.shape == g.shape
  for k in FIELDS:
    a, b = getattr(f, k), getattr(g, k)
    assert (a is None) == (b is None), k
    if a is not None:
      assert a.dtype == b.dtype, k
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)


def heavy(key, shape, planted=5):
  a = jax.random.normal(key, shape)
  idx = jax.random.choice(jax.random.fold_in(key, 1), a.size, (planted,), replace=False)
  return a.reshape(-1).at[idx].set(80.0).reshape(shape)


@pytest.fixture(scope="module")
def tree():
  key = jax.random.key(0)
  return {
      # sparse part (planted outliers), rate budget
      "a": sc.decompose(heavy(key, (40, 70)), key=jax.random.key(1), rate=0.5),
      # batch of 3 with an early stop: different num_cuts, trimmed on disk
      "stack": sc.decompose(jax.random.normal(key, (3, 33, 65)), key=jax.random.key(2),
                            width=200, max_error=0.3, outliers=0),
      "layers": [{"b": jnp.arange(5.0), "w16": jnp.ones((4, 4), jnp.bfloat16)},
                 {"i": np.arange(6, dtype=np.int32).reshape(2, 3)}],
      "step": np.int64(7),
  }


def test_round_trip_bit_identical(tree, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, tree, metadata={"note": "hi", "n": [1, 2]})
  back = sc.load(path)
  assert set(back) == {"a", "stack", "layers", "step"}
  assert_same_factors(tree["a"], back["a"])
  assert_same_factors(tree["stack"], back["stack"])
  assert int(tree["a"].num_sparse) > 0
  assert isinstance(back["layers"], list) and len(back["layers"]) == 2
  np.testing.assert_array_equal(back["layers"][0]["b"], np.arange(5.0, dtype=np.float32))
  assert back["layers"][0]["w16"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(back["layers"][1]["i"], tree["layers"][1]["i"])
  assert back["step"].shape == () and back["step"] == 7
  assert sc.load_info(path)["user"] == {"note": "hi", "n": [1, 2]}


def test_only_used_cuts_are_stored(tree, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, {"stack": tree["stack"]})
  used = int(np.max(tree["stack"].num_cuts))
  assert used < tree["stack"].width
  with safe_open(str(path), framework="numpy") as f:
    assert f.get_slice("stack/s_bits").get_shape() == [3, used, 2]
    assert f.get_slice("stack/c").get_shape() == [3, used]
  entry = sc.load_info(path)["leaves"][0]
  assert entry["width"] == 200 and entry["stored_width"] == used
  assert entry["nbytes"] == sc.nbytes(tree["stack"])


def test_file_is_plain_safetensors(tree, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, tree)
  with safe_open(str(path), framework="numpy") as f:
    meta = f.metadata()
    assert meta["format"] == "jax_signedcut" and meta["format_version"] == "1"
    assert "layers/0/b" in f.keys() and "a/sparse_idx" in f.keys()


def test_single_leaf_tree(tmp_path):
  f = sc.decompose(jnp.ones((20, 20)), key=jax.random.key(0), width=3)
  sc.save(tmp_path / "one.safetensors", f)
  assert_same_factors(f, sc.load(tmp_path / "one.safetensors"))


def test_expand_equals_reconstruct(tree, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, tree)
  dense = sc.expand(sc.load(path), jnp.float32)
  for k in ("a", "stack"):
    np.testing.assert_allclose(dense[k], sc.reconstruct(tree[k]), rtol=1e-6, atol=1e-6)
  assert dense["stack"].shape == (3, 33, 65)
  assert sc.expand(tree)["a"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(dense["layers"][0]["b"], np.arange(5.0))
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    sc.expand(tree, jnp.float16)


def test_truncate_at_load_equals_lower_rate(tmp_path):
  a = heavy(jax.random.key(3), (48, 80))
  key = jax.random.key(4)
  sc.save(tmp_path / "half.safetensors", {"w": sc.decompose(a, key=key, rate=0.5)})
  quarter = sc.decompose(a, key=key, rate=0.25)
  assert int(quarter.num_sparse) > 0
  assert_same_factors(quarter, sc.load(tmp_path / "half.safetensors", truncate_rate=0.25)["w"])
  half = sc.load(tmp_path / "half.safetensors")["w"]
  assert_same_factors(sc.truncate(half, bits_per_weight=3),
                      sc.load(tmp_path / "half.safetensors", truncate_bits=3)["w"])
  with pytest.raises(ValueError, match="at most one"):
    sc.load(tmp_path / "half.safetensors", truncate_rate=0.25, truncate_bits=3)


# ----------------------------------------------------------------------------
# Corrupt, truncated, inconsistent and newer files


@pytest.fixture
def saved(tree, tmp_path):
  path = tmp_path / "t.safetensors"
  sc.save(path, {"a": tree["a"], "stack": tree["stack"], "b": jnp.arange(5.0)})
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


def entry(b, path):
  return next(e for e in b["leaves"] if e["path"] == path)


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
  with pytest.raises(ValueError, match="corrupt .CRC-32"):
    sc.load(saved)


def test_garbage_header(saved):
  data = bytearray(saved.read_bytes())
  data[8:12] = b"}}}}"
  saved.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=str(saved)):
    sc.load(saved)


def test_newer_version(saved):
  rewrite(saved, meta=lambda md: md.update(format_version="3"))
  with pytest.raises(ValueError, match="format version 3 is newer"):
    sc.load(saved)


def test_not_our_format(tmp_path):
  p = tmp_path / "plain.safetensors"
  save_file({"w": np.ones((2, 2), np.float32)}, str(p))
  with pytest.raises(ValueError, match="not a jax_signedcut checkpoint"):
    sc.load(p)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    sc.load(tmp_path / "nope.safetensors")


def _set_shape(b):
  entry(b, "a")["shape"] = [40, 90]       # t_bits has ceil(70/32)=3 words, 90 needs 3 too…
  entry(b, "a")["shape"] = [70, 40]       # …so swap: s_bits then needs 3 words, has 2


def _cut_more(ts):
  ts["stack/num_cuts"] = ts["stack/num_cuts"] + 500


def _idx_out_of_range(ts):
  ts["a/sparse_idx"] = ts["a/sparse_idx"].copy()
  ts["a/sparse_idx"][..., 0] = 40 * 70


@pytest.mark.parametrize("edit,match", [
    (dict(body=_set_shape), "has shape .* the metadata says"),
    (dict(body=lambda b: entry(b, "a").update(stored_width=10**6)), "stored width"),
    (dict(body=lambda b: entry(b, "stack").update(width=1)), "stored width"),
    (dict(tensors=_cut_more), "num_cuts .* outside"),
    (dict(tensors=_idx_out_of_range), "sparse indices out of range"),
    (dict(tensors=lambda ts: ts.update({"stack/c": ts["stack/c"] * np.nan})), "NaN"),
    (dict(tensors=lambda ts: ts.update({"extra": np.ones(2, np.float32)})), "not described"),
    (dict(tensors=lambda ts: ts.pop("b")), "missing from the file"),
    (dict(tensors=lambda ts: ts.update({"b": ts["b"].astype(np.float64)})), "dtype float64"),
    (dict(tensors=lambda ts: ts.update({"a/t_bits": ts["a/t_bits"] | np.uint32(1 << 31)})),
     "bits set past"),
    (dict(body=lambda b: b.update(leaves=[{"kind": "weird"}])), "malformed"),
])
def test_inconsistent_metadata(saved, edit, match):
  rewrite(saved, **edit)
  with pytest.raises(ValueError, match=match) as e:
    sc.load(saved)
  assert str(saved) in str(e.value)


def test_unflatten_rejects_conflicts():
  with pytest.raises(ValueError, match="both a leaf and a container"):
    _checkpoint.unflatten([([["d", "a"]], 1), ([["d", "a"], ["d", "b"]], 2)])
  with pytest.raises(ValueError, match="mixes sequence and mapping"):
    _checkpoint.unflatten([([["d", "a"], ["i", 0]], 1), ([["d", "a"], ["d", "x"]], 2)])


def test_save_rejects_traced_and_bad_metadata(tmp_path):
  f = sc.decompose(jnp.ones((20, 20)), key=jax.random.key(0), width=3)
  with pytest.raises(ValueError, match="JSON"):
    sc.save(tmp_path / "x.safetensors", f, metadata={"x": object()})

  def inside(g):
    sc.save(tmp_path / "y.safetensors", g)
    return g.c
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(inside)(f)
  assert not list(tmp_path.iterdir())    # nothing half-written


# ----------------------------------------------------------------------------
# Orbax


def test_orbax_signed_cut_tree(tree, tmp_path):
  sub = {"a": tree["a"], "stack": tree["stack"], "b": jnp.arange(5.0)}
  sc.save_orbax(tmp_path / "ck", sub)
  back = sc.load_orbax(tmp_path / "ck")
  assert_same_factors(tree["a"], back["a"])
  assert_same_factors(tree["stack"], back["stack"])
  np.testing.assert_array_equal(back["b"], np.arange(5.0))


def test_orbax_nnx_state_round_trip(tmp_path):
  from jax_signedcut.nnx import swap_linears  # noqa: PLC0415

  def model(seed):
    m = nnx.Sequential(nnx.Linear(32, 48, rngs=nnx.Rngs(seed)), nnx.relu,
                       nnx.Linear(48, 16, rngs=nnx.Rngs(seed + 1)))
    swap_linears(m, sc.decompose(nnx.state(m, nnx.Param), key=jax.random.key(seed), rate=0.5))
    return m

  m, m2 = model(0), model(5)
  x = jax.random.normal(jax.random.key(9), (3, 32))
  assert not np.array_equal(m(x), m2(x))
  sc.save_orbax(tmp_path / "nnx", nnx.state(m))
  nnx.update(m2, sc.load_orbax(tmp_path / "nnx", like=nnx.state(m2)))
  np.testing.assert_array_equal(m(x), m2(x))


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


def test_dataclass_replace_keeps_trim_invariant(tree):
  # The file relies on slots past num_cuts being zero (they are padded back).
  f = tree["stack"]
  past = np.arange(f.width) >= np.asarray(f.num_cuts)[:, None]
  assert not np.any(np.asarray(f.c)[past])
  assert not np.any(np.asarray(f.s_bits)[past])
  assert dataclasses.is_dataclass(f)
