"""The ``jax-signedcut`` command line, called in-process through ``main(argv)``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_checkpoint import DATA

import jax_signedcut as sc
from conftest import assert_same_factors
from jax_signedcut._cli import main
from jax_signedcut._core import tree as _tree
from jax_signedcut._signedcut import decompose as _decompose


def run(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(a)


@pytest.fixture(scope="module")
def gauss(tmp_path_factory):
  """Two Gaussian matrices and a bias, compressed at rate 1/2 and 1/4."""
  d = tmp_path_factory.mktemp("gauss")
  rng = np.random.default_rng(0)
  tensors = {"l1.weight": rng.standard_normal((256, 256)).astype(np.float32),
             "l2.weight": rng.standard_normal((384, 96)).astype(np.float32),
             "l1.bias": rng.standard_normal(256).astype(np.float32)}
  save_file(tensors, str(d / "in.safetensors"))
  for rate, name in ((0.5, "half"), (0.25, "quarter")):
    assert main(["compress", str(d / "in.safetensors"), str(d / f"{name}.safetensors"),
                 "--rate", str(rate), "-q"]) == 0
  return d, tensors


def test_compress_expand_errors(gauss, capsys):
  d, tensors = gauss
  code, out, err = run(capsys, "expand", d / "half.safetensors", d / "dense.safetensors",
                       "--dtype", "f32")
  assert code == 0 and not err
  dense = load_file(str(d / "dense.safetensors"))
  assert set(dense) == set(tensors)
  # The greedy's figures at these widths (963 and 542 cuts): 0.0292 and 0.0458.
  assert abs(rel(tensors["l1.weight"], dense["l1.weight"]) - 0.029) < 0.004
  assert abs(rel(tensors["l2.weight"], dense["l2.weight"]) - 0.046) < 0.005
  np.testing.assert_array_equal(dense["l1.bias"], tensors["l1.bias"])
  assert dense["l1.weight"].dtype == np.float32
  # ... and the expanded values are reconstruct's.
  f = sc.load(d / "half.safetensors")
  np.testing.assert_allclose(dense["l2.weight"], sc.reconstruct(f["l2.weight"]), rtol=1e-6,
                             atol=1e-6)
  run(capsys, "expand", d / "half.safetensors", d / "dense16.safetensors")
  assert load_file(str(d / "dense16.safetensors"))["l1.weight"].dtype == jnp.bfloat16


def test_compress_matches_library(gauss):
  d, tensors = gauss
  f = sc.load(d / "half.safetensors")
  assert isinstance(f["l1.bias"], np.ndarray)
  for name in ("l1.weight", "l2.weight"):
    want = sc.decompose(jnp.asarray(tensors[name]),
                        key=_tree.leaf_key(jax.random.key(0), name), rate=0.5)
    assert_same_factors(want, f[name])


def test_truncate_half_to_quarter(gauss, capsys):
  d, _ = gauss
  quarter = sc.load(d / "quarter.safetensors")
  cut = sc.load(d / "half.safetensors", truncate_rate=0.25)
  for name in ("l1.weight", "l2.weight"):
    assert_same_factors(quarter[name], cut[name])
  code, _, _ = run(capsys, "expand", d / "half.safetensors", d / "q1.safetensors",
                   "--truncate-rate", "0.25", "--dtype", "f32")
  assert code == 0
  run(capsys, "expand", d / "quarter.safetensors", d / "q2.safetensors", "--dtype", "f32")
  a, b = load_file(str(d / "q1.safetensors")), load_file(str(d / "q2.safetensors"))
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])


def test_inspect(gauss, capsys):
  d, tensors = gauss
  code, out, err = run(capsys, "inspect", d / "half.safetensors")
  assert code == 0, err
  lines = out.splitlines()
  row = next(line for line in lines if line.startswith("l1.weight"))
  assert "256x256" in row and "cuts 963/963" in row
  est = float(row.split()[-1])
  assert "rel.err: as estimated when compressing" in out
  code, out, _ = run(capsys, "inspect", d / "half.safetensors", "--original",
                     d / "in.safetensors")
  row = next(line for line in out.splitlines() if line.startswith("l1.weight"))
  measured = float(row.split()[-1])
  assert f"rel.err: measured against {d / 'in.safetensors'} for 2 of 2 compressed leaves" in out
  assert abs(measured - est) < 1e-3
  assert abs(measured - rel(tensors["l1.weight"],
                            sc.expand(sc.load(d / "half.safetensors"), jnp.float32)["l1.weight"])
             ) < 1e-4
  assert any(line.startswith("total") for line in lines)


def test_inspect_marks_estimates(gauss, tmp_path, capsys):
  d, tensors = gauss
  save_file({"l1.weight": tensors["l1.weight"]}, str(tmp_path / "part.safetensors"))
  code, out, err = run(capsys, "inspect", d / "half.safetensors", "--original",
                       tmp_path / "part.safetensors")
  assert code == 0 and "'l2.weight' is not in" in err
  rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if "weight" in line}
  assert not rows["l1.weight"].endswith("*") and rows["l2.weight"].endswith("*")
  assert "for 1 of 2 compressed leaves; 1 marked * are estimates" in out


def test_rate_above_bf16_warns(small, tmp_path, capsys):
  code, _, err = run(capsys, "compress", small, tmp_path / "o.safetensors", "--rate", "2", "-q")
  assert code == 0, err
  assert "warning: default budget: rate 2 is more than a bf16 copy" in err
  code, _, err = run(capsys, "compress", small, tmp_path / "p.safetensors", "--rate", "0.5",
                     "--rule", "w=bits=20", "-q")
  assert code == 0 and "warning: rule 'w': bits 20 is more than a bf16 copy" in err


def test_rules_skip_width_max_error(gauss, tmp_path, capsys):
  d, tensors = gauss
  out = tmp_path / "o.safetensors"
  code, stdout, err = run(capsys, "compress", d / "in.safetensors", out, "--width", "16",
                          "--rule", "l2=bits=2", "--rule", "nomatch=dense", "--skip", "bias",
                          "--outliers", "0")
  assert code == 0, err
  assert "nomatch" in err and "warning" in err        # the rule that selected nothing
  info = {e["path"]: e for e in sc.load_info(out)["leaves"]}
  assert info["l1.weight"]["value"]["slots"]["width"] == 16
  assert info["l2.weight"]["value"]["slots"]["width"] == sc.width_for_bits(384, 96, 2)
  assert info["l1.bias"]["kind"] == "array"
  assert "l1.weight" in stdout and "total" in stdout
  code, _, err = run(capsys, "compress", d / "in.safetensors", out, "--rule",
                     "weight=max_error=0.5,width=300", "-q")
  assert code == 0, err
  f = sc.load(out)
  for name in ("l1.weight", "l2.weight"):
    cuts = f[name].part(sc.SignedCut) if isinstance(f[name], sc.Sum) else f[name]
    assert int(cuts.num_cuts) < 300
    assert rel(tensors[name], sc.reconstruct(f[name])) <= 0.5


def test_shards_directory(tmp_path, capsys):
  shards = tmp_path / "shards"
  shards.mkdir()
  rng = np.random.default_rng(1)
  save_file({"a": rng.standard_normal((32, 40)).astype(np.float32)},
            str(shards / "m-00001.safetensors"))
  save_file({"b": rng.standard_normal((48, 32)).astype(np.float32)},
            str(shards / "m-00002.safetensors"))
  code, _, err = run(capsys, "compress", shards, tmp_path / "o.safetensors", "--width", "8",
                     "-q")
  assert code == 0, err
  assert set(sc.load(tmp_path / "o.safetensors")) == {"a", "b"}


def test_orbax_linen_model(tmp_path, capsys):
  import flax.linen as nn  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  mlp = nn.Sequential([nn.Dense(48), nn.relu, nn.Dense(24)])
  params = mlp.init(jax.random.key(0), jnp.ones((1, 40)))
  with ocp.StandardCheckpointer() as ck:
    ck.save(tmp_path / "ckpt", params)
  code, _, err = run(capsys, "compress", tmp_path / "ckpt", tmp_path / "c.safetensors",
                     "--rate", "0.5", "-q")
  assert code == 0, err
  f = sc.load(tmp_path / "c.safetensors")
  assert isinstance(f["params"]["layers_0"]["kernel"], (sc.SignedCut, sc.Sum))
  assert isinstance(f["params"]["layers_0"]["bias"], np.ndarray)
  code, _, err = run(capsys, "expand", tmp_path / "c.safetensors", tmp_path / "dense",
                     "--dtype", "f32", "-q")
  assert code == 0, err
  back = sc.load_orbax(tmp_path / "dense")
  assert jax.tree.structure(back) == jax.tree.structure(params)
  x = jax.random.normal(jax.random.key(1), (5, 40))
  want = mlp.apply(sc.expand(f, jnp.float32), x)
  np.testing.assert_allclose(mlp.apply(back, x), want, rtol=1e-5, atol=1e-5)
  assert rel(mlp.apply(params, x), want) < 0.5     # 40x48 and 48x24 at rate 1/2: ~10 % per kernel
  # An existing orbax output directory is refused, not overwritten.
  code, _, err = run(capsys, "expand", tmp_path / "c.safetensors", tmp_path / "dense")
  assert code == 1 and "exists" in err


def test_orbax_input_is_read_leaf_by_leaf(tmp_path, capsys, monkeypatch):
  """An orbax input is restored one leaf at a time (partial restores), never whole."""
  import ml_dtypes  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from jax_signedcut._checkpoint import orbax as _orbax  # noqa: PLC0415
  from jax_signedcut._checkpoint import structure as _structure  # noqa: PLC0415

  rng = np.random.default_rng(0)
  tree = {"enc": {"kernel": rng.standard_normal((64, 48)).astype(np.float32),
                  "bias": np.zeros(48, np.float32)},
          "blocks": [rng.standard_normal((32, 40)).astype(ml_dtypes.bfloat16),
                     np.arange(6, dtype=np.int32)]}
  with ocp.StandardCheckpointer() as ck:
    ck.save(tmp_path / "ckpt", tree)
  specs, meta = _orbax.orbax_leaf_specs(tmp_path / "ckpt")
  whole = _structure.flatten(sc.load_orbax(tmp_path / "ckpt"))
  assert [c for c, _, _ in specs] == [c for c, _ in whole]
  for i, ((comps, shape, dtype), (_, leaf)) in enumerate(zip(specs, whole)):
    got = _orbax.restore_orbax_leaf(tmp_path / "ckpt", meta, i)
    assert got.shape == shape == np.shape(leaf) and got.dtype == dtype == np.asarray(leaf).dtype
    np.testing.assert_array_equal(got, np.asarray(leaf))

  calls = []
  real = _orbax.restore_orbax_leaf
  monkeypatch.setattr(_orbax, "restore_orbax_leaf",
                      lambda d, t, i: calls.append(i) or real(d, t, i))
  monkeypatch.setattr(_orbax, "load_orbax", lambda *a, **k: pytest.fail("restored whole"))
  code, _, err = run(capsys, "compress", tmp_path / "ckpt", tmp_path / "c.safetensors",
                     "--width", "20", "-q")
  assert code == 0, err
  assert sorted(calls) == list(range(len(specs)))
  f = sc.load(tmp_path / "c.safetensors")
  want = _decompose.decompose(jnp.asarray(tree["enc"]["kernel"]), key=_tree.leaf_key(
      jax.random.key(0), "enc/kernel"), width=20)
  assert_same_factors(want, f["enc"]["kernel"])
  np.testing.assert_array_equal(f["blocks"][1], tree["blocks"][1])

  # A compressed orbax checkpoint is not a compress input: a one-line error.
  sc.save_orbax(tmp_path / "packed", f)
  code, _, err = run(capsys, "compress", tmp_path / "packed", tmp_path / "d.safetensors",
                     "--width", "8")
  assert code == 1 and "already a jax_signedcut" in err and "Traceback" not in err


# ----------------------------------------------------------------------------
# Errors: one line on stderr, non-zero exit, no traceback


def one_line_error(code, out, err):
  assert code != 0
  assert "Traceback" not in err
  assert len(err.strip().splitlines()) == 1, err
  return err


@pytest.fixture
def small(tmp_path):
  p = tmp_path / "small.safetensors"
  save_file({"w": np.ones((20, 24), np.float32), "b": np.ones(4, np.float32)}, str(p))
  return p


def test_missing_input(tmp_path, capsys):
  err = one_line_error(*run(capsys, "compress", tmp_path / "nope.safetensors",
                            tmp_path / "o.safetensors", "--rate", "0.5"))
  assert "nope.safetensors" in err and "no such file" in err
  one_line_error(*run(capsys, "expand", tmp_path / "nope.safetensors",
                      tmp_path / "o.safetensors"))
  one_line_error(*run(capsys, "inspect", tmp_path / "nope.safetensors"))


def test_truncated_and_corrupt_input(small, gauss, tmp_path, capsys):
  data = small.read_bytes()
  small.write_bytes(data[:-5])
  err = one_line_error(*run(capsys, "compress", small, tmp_path / "o.safetensors", "--rate", "1"))
  assert "truncated or corrupt" in err
  assert not (tmp_path / "o.safetensors").exists()
  d, _ = gauss
  bad = tmp_path / "bad.safetensors"
  raw = bytearray((d / "half.safetensors").read_bytes())
  raw[-100] ^= 1
  bad.write_bytes(bytes(raw))
  err = one_line_error(*run(capsys, "expand", bad, tmp_path / "e.safetensors"))
  assert "CRC-32" in err
  bad.write_bytes(bytes(raw[:len(raw) // 2]))
  one_line_error(*run(capsys, "expand", bad, tmp_path / "e.safetensors"))
  assert not (tmp_path / "e.safetensors").exists()


def test_unknown_version(gauss, tmp_path, capsys):
  d, _ = gauss
  with safe_open(str(d / "half.safetensors"), framework="numpy") as f:
    ts = {k: f.get_tensor(k) for k in f.keys()}
    md = dict(f.metadata(), format_version="7")
  save_file(ts, str(tmp_path / "v7.safetensors"), metadata=md)
  err = one_line_error(*run(capsys, "expand", tmp_path / "v7.safetensors",
                            tmp_path / "e.safetensors"))
  assert "format version 7 is newer" in err


def test_unwritable_output(small, tmp_path, capsys):
  err = one_line_error(*run(capsys, "compress", small, tmp_path / "no" / "dir" / "o.safetensors",
                            "--rate", "1"))
  assert "does not exist" in err
  err = one_line_error(*run(capsys, "compress", small, tmp_path, "--rate", "1"))
  assert "is a directory" in err
  (tmp_path / "file").write_text("x")
  one_line_error(*run(capsys, "compress", small, tmp_path / "file" / "o.safetensors",
                      "--rate", "1"))


@pytest.mark.parametrize("args", [
    ["--rate", "0"], ["--rate", "-1"], ["--bits", "abc"], ["--width", "2.5"],
    ["--rate", "0.5", "--bits", "4"], ["--rule", "w=speed=3"], ["--rule", "(=rate=0.5"],
    ["--rule", "w=rate=0.5,width=3"], ["--outliers", "2"], [],
    ["--rate", "1e-9"],          # pays for no cut of the 20x24 matrix
])
def test_bad_budget(small, tmp_path, capsys, args):
  one_line_error(*run(capsys, "compress", small, tmp_path / "o.safetensors", *args))
  assert not (tmp_path / "o.safetensors").exists()


def test_debug_shows_traceback(tmp_path):
  with pytest.raises(FileNotFoundError):
    main(["expand", str(tmp_path / "nope.safetensors"), str(tmp_path / "o.safetensors"),
          "--debug"])


def test_interrupt_leaves_no_output(small, tmp_path, capsys, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(_decompose, "_decompose_leaf", interrupted)
  out = tmp_path / "o.safetensors"
  code, _, err = run(capsys, "compress", small, out, "--width", "4")
  assert code == 130 and "interrupted" in err
  assert sorted(os.listdir(tmp_path)) == ["small.safetensors"]


def test_help(capsys):
  code, out, _ = run(capsys, "--help")
  assert code == 0 and "examples:" in out and "compress" in out
  code, out, _ = run(capsys, "compress", "--help")
  assert code == 0 and "--rule REGEX=BUDGET" in out and "rate=0.25" in out


def test_console_script(small, tmp_path):
  exe = shutil.which("jax-signedcut", path=os.path.dirname(sys.executable))
  if exe is None:
    pytest.skip("the console script is not installed next to this python")
  res = subprocess.run([exe, "compress", str(small), str(tmp_path / "o.safetensors"),
                        "--width", "4", "-q"], capture_output=True, text=True, timeout=300,
                       check=False)
  assert res.returncode == 0, res.stderr
  w = sc.load(tmp_path / "o.safetensors")["w"]
  assert (w.part(sc.SignedCut) if isinstance(w, sc.Sum) else w).width == 4
  res = subprocess.run([exe, "inspect", str(tmp_path / "missing.safetensors")],
                       capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_orbax_nnx_state_and_stacked_leaf(tmp_path, capsys):
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  model = nnx.Sequential(nnx.Linear(32, 40, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(40, 16, rngs=nnx.Rngs(1)))
  with ocp.StandardCheckpointer() as ck:
    ck.save(tmp_path / "nnx", nnx.state(model))
  code, _, err = run(capsys, "compress", tmp_path / "nnx", tmp_path / "c.safetensors",
                     "--width", "24", "-q")
  assert code == 0, err
  code, _, err = run(capsys, "expand", tmp_path / "c.safetensors", tmp_path / "dense",
                     "--dtype", "f32", "-q")
  assert code == 0, err
  twin = nnx.Sequential(nnx.Linear(32, 40, rngs=nnx.Rngs(7)), nnx.relu,
                        nnx.Linear(40, 16, rngs=nnx.Rngs(8)))
  nnx.update(twin, sc.load_orbax(tmp_path / "dense", like=nnx.state(twin)))
  f = sc.expand(sc.load(tmp_path / "c.safetensors"), jnp.float32)
  # orbax keeps the nnx.Variable level as a "value" key.
  np.testing.assert_allclose(twin.layers[0].kernel[...], f["layers"]["0"]["kernel"]["value"],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(twin.layers[2].bias[...], model.layers[2].bias[...])

  # A stacked (nn.scan-style) leaf is compressed as a batch with the leaf's key.
  stacked = {"blocks": {"w": np.asarray(jax.random.normal(jax.random.key(2), (3, 24, 40)))}}
  with ocp.StandardCheckpointer() as ck:
    ck.save(tmp_path / "stack", stacked)
  code, _, err = run(capsys, "compress", tmp_path / "stack", tmp_path / "s.safetensors",
                     "--width", "24", "--outliers", "0", "-q")
  assert code == 0, err
  got = sc.load(tmp_path / "s.safetensors")["blocks"]["w"]
  want = sc.decompose(jnp.asarray(stacked["blocks"]["w"]), width=24, outliers=0,
                      key=_tree.leaf_key(jax.random.key(0), "blocks/w"))
  assert got.batch_shape == (3,)
  assert_same_factors(want, got)


# ----------------------------------------------------------------------------
# Methods other than signed cuts, and files of earlier format versions

METHODS = ["signed_cut", "rtn", "lplr", "dsvd", "lp_lowrank"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
  d = tmp_path_factory.mktemp("methods")
  rng = np.random.default_rng(3)
  tensors = {"l1.weight": rng.standard_normal((64, 48)).astype(np.float32),
             "l2.weight": rng.standard_normal((40, 33)).astype(np.float32),
             "l1.bias": rng.standard_normal(48).astype(np.float32)}
  save_file(tensors, str(d / "in.safetensors"))
  return d, tensors


@pytest.mark.parametrize("method", METHODS)
def test_compress_every_method(small_model, tmp_path, capsys, method):
  d, tensors = small_model
  out = tmp_path / "o.safetensors"
  code, stdout, err = run(capsys, "compress", d / "in.safetensors", out, "--method", method,
                          "--bits", "4")
  assert code == 0, err
  f = sc.load(out)
  for name in ("l1.weight", "l2.weight"):
    want = sc.decompose(jnp.asarray(tensors[name]), key=_tree.leaf_key(jax.random.key(0), name),
                        bits_per_weight=4, method=method)
    assert_same_factors(want, f[name])
    assert 8 * sc.nbytes(f[name]) <= 4 * tensors[name].size
  np.testing.assert_array_equal(f["l1.bias"], tensors["l1.bias"])
  row = next(line for line in stdout.splitlines() if line.startswith("l1.weight"))
  assert "64x48" in row and (method == "signed_cut" or f"{method}: " in row)
  logged = float(row.split()[-1])
  # expand gives reconstruct's matrices; inspect --original measures the logged error.
  code, _, err = run(capsys, "expand", out, tmp_path / "dense.safetensors", "--dtype", "f32")
  assert code == 0, err
  dense = load_file(str(tmp_path / "dense.safetensors"))
  np.testing.assert_array_equal(dense["l1.weight"], np.asarray(sc.reconstruct(f["l1.weight"])))
  code, out_text, err = run(capsys, "inspect", out, "--original", d / "in.safetensors")
  assert code == 0, err
  row = next(line for line in out_text.splitlines() if line.startswith("l1.weight"))
  assert abs(float(row.split()[-1]) - logged) < 1e-3
  assert abs(logged - rel(tensors["l1.weight"], dense["l1.weight"])) < 1e-3
  assert sc.load_info(out)["leaves"][1]["method"] == method


def test_methods_mixed_by_rule(small_model, tmp_path, capsys):
  d, tensors = small_model
  out = tmp_path / "o.safetensors"
  code, _, err = run(capsys, "compress", d / "in.safetensors", out, "--bits", "3",
                     "--rule", "l2=bits=8,method=rtn,option.group_size=16",
                     "--method", "lplr", "--option", "bits=8:4", "-q")
  assert code == 0, err
  f = sc.load(out)
  key = lambda name: _tree.leaf_key(jax.random.key(0), name)  # noqa: E731
  assert_same_factors(sc.decompose(jnp.asarray(tensors["l2.weight"]), key=key("l2.weight"),
                                bits_per_weight=8, method="rtn", options={"group_size": 16}),
                   f["l2.weight"])
  assert_same_factors(sc.decompose(jnp.asarray(tensors["l1.weight"]), key=key("l1.weight"),
                                bits_per_weight=3, method="lplr", options={"bits": (8, 4)}),
                   f["l1.weight"])
  assert isinstance(f["l2.weight"], sc.QuantizedMatrix) and f["l2.weight"].group_size == 16
  assert isinstance(f["l1.weight"], sc.LowRank)


@pytest.mark.parametrize("args,match", [
    (["--method", "nope", "--bits", "4"], "method must be one of"),
    (["--method", "rtn", "--width", "4"], "takes a --rate or --bits budget"),
    (["--method", "rtn", "--bits", "4", "--max-error", "0.1"], "takes a --rate or --bits"),
    (["--method", "rtn", "--bits", "4", "--option", "nope=1"], "takes the options"),
    (["--bits", "4", "--option", "group_size=64"], "--option is for the other methods"),
    (["--method", "rtn", "--bits", "0.01"], "pays for no"),
    (["--bits", "4", "--rule", "w=bits=4,option.group_size=8"], "need the method"),
])
def test_method_errors(small, tmp_path, capsys, args, match):
  err = one_line_error(*run(capsys, "compress", small, tmp_path / "o.safetensors", *args))
  assert re.search(match, err), err
  assert not (tmp_path / "o.safetensors").exists()


def test_legacy_files(tmp_path, capsys):
  for version in ("v1", "v2"):
    path = os.path.join(DATA, f"legacy_{version}.safetensors")
    code, out, err = run(capsys, "inspect", path)
    assert code == 0, err
    if version == "v2":
      row = next(line for line in out.splitlines() if line.startswith("pos"))
      assert "rank 2 bf16 + cuts 6/19 + 4 sparse" in row and "32x24" in row
    code, _, err = run(capsys, "expand", path, tmp_path / f"{version}.safetensors", "--dtype",
                       "f32")
    assert code == 0, err
    dense = load_file(str(tmp_path / f"{version}.safetensors"))
    want = sc.expand(sc.load(path), jnp.float32)
    for name, leaf in _structure_flat(want):
      np.testing.assert_array_equal(dense[name], np.asarray(leaf, dense[name].dtype))


def _structure_flat(tree):
  from jax_signedcut._checkpoint import structure as _structure  # noqa: PLC0415
  from jax_signedcut._core import keypath  # noqa: PLC0415

  return [(keypath.join(c), leaf) for c, leaf in _structure.flatten(tree)]


def test_truncate_leaves_other_methods_as_stored(small_model, tmp_path, capsys):
  d, _ = small_model
  out = tmp_path / "o.safetensors"
  code, _, err = run(capsys, "compress", d / "in.safetensors", out, "--bits", "4",
                     "--rule", "l2=bits=8,method=rtn", "-q")
  assert code == 0, err
  code, _, err = run(capsys, "expand", out, tmp_path / "e.safetensors", "--truncate-bits", "2",
                     "--dtype", "f32", "-q")
  assert code == 0, err
  dense = load_file(str(tmp_path / "e.safetensors"))
  f = sc.load(out)
  cut = sc.truncate(f["l1.weight"], bits_per_weight=2)
  np.testing.assert_array_equal(dense["l1.weight"], np.asarray(sc.reconstruct(cut)))
  np.testing.assert_array_equal(dense["l2.weight"], np.asarray(sc.reconstruct(f["l2.weight"])))
