"""``decompose(..., calibration=...)``: one matrix, pytrees matched by path, GPTQ by name, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as sc
from jax_signedcut._calibration import cuts, gptq, objective
from jax_signedcut._core import tree as _tree
from jax_signedcut._methods import registry

KEY = jax.random.key(0)
# One shape, budget and option set throughout: each new one compiles the search again.
OPTS = {"fallback": False, "sparse_fraction": 0.01}


def _problem(m=32, n=48, tokens=300, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, m)) * np.exp(rng.normal(scale=2.0, size=m))  # uneven channels
  x[:, 1] += 0.8 * x[:, 0]
  w = rng.normal(size=(m, n))
  return jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x / tokens, jnp.float32)


def _err(w, f, h):
  return float(objective.relative_output_error(w, f.reconstruct(), h))


def _same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_one_matrix_is_the_calibrated_pipeline_within_budget_and_beats_plain_cuts():
  w, h = _problem()
  f = sc.decompose(w, key=KEY, bits_per_weight=4, calibration=h, options=OPTS)
  opts = cuts.CutOptions()
  width = (4 * w.size // 8 - 4 * w.shape[0] - 8 * int(0.01 * w.size)) // sc.bytes_per_cut(*w.shape)
  part, _ = cuts.calibrated_cuts(w, h, key=KEY, width=int(width), options=opts)
  want = cuts.fit_budget(part, w, h, bits_per_weight=4, sparse_fraction=0.01, options=opts)
  _same(f, want)
  assert isinstance(f, sc.InputScaled) and sc.nbytes(f) <= 4 * w.size / 8
  plain = sc.decompose(w, key=KEY, bits_per_weight=4)
  assert _err(w, f, h) < 0.7 * _err(w, plain, h)
  _same(sc.decompose(w, key=KEY, rate=0.25, calibration=h, options=OPTS), f)   # 16·r bits
  # The defaults are the C++ cuts of D·W with three H-aware backfitting passes.
  assert (opts.search, opts.backfit) == ("diag", 3)
  # The hcut search keeping Q = H⁻¹P (for n < m) finds the same cuts as the one solving per
  # round.
  hopts = cuts.CutOptions(search="hcut", backfit=0)
  part, _ = cuts.calibrated_cuts(w, h, key=KEY, width=int(width), options=hopts)
  hs = cuts.search_metric(h / f.scale[:, None] / f.scale[None, :], hopts)
  kept = objective._hcut(f.scale[:, None] * w, hs, KEY, width=int(width), max_flips=256,  # noqa: SLF001
                         max_rounds=20, keep_q=True)
  np.testing.assert_array_equal(np.asarray(sc.pack_signs(kept[0])), np.asarray(part.inner.s_bits))
  np.testing.assert_array_equal(np.asarray(sc.pack_signs(kept[1])), np.asarray(part.inner.t_bits))


def test_fallback_keeps_whichever_has_the_lower_output_error():
  w, h = _problem()
  for hh in (h, jnp.eye(32)):      # under H = I the input scales only cost bytes
    ours = sc.decompose(w, key=KEY, bits_per_weight=4, calibration=hh, options=OPTS)
    plain = sc.decompose(w, key=KEY, bits_per_weight=4)
    best = sc.decompose(w, key=KEY, bits_per_weight=4, calibration=hh,
                        options={**OPTS, "fallback": True})
    _same(best, ours if _err(w, ours, hh) <= _err(w, plain, hh) else plain)
  assert isinstance(best, sc.Sum)  # plain cuts won under H = I


def test_gptq_by_name_is_gptq_at_the_widest_code_that_fits():
  w, h = _problem()
  assert "gptq" in registry.names() and registry.get("gptq").calibration == "required"
  q = sc.decompose(w, key=KEY, bits_per_weight=5.5, calibration=h, method="gptq")
  _same(q, gptq.gptq(w, h, bits=4))                # 4 bits + one f32 scale per 32 inputs
  assert sc.nbytes(q) * 8 == 5 * w.size
  g = sc.decompose(w, key=KEY, bits_per_weight=8, calibration=h, method="gptq",
                   options={"group_size": 8})
  _same(g, gptq.gptq(w, h, bits=4, group_size=8))
  with pytest.raises(ValueError, match="needs calibration statistics"):
    sc.decompose(w, key=KEY, bits_per_weight=4, method="gptq")


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):   # two kernels of the shape the other tests compile for
    return nn.Dense(48, name="up")(x) * jnp.tanh(nn.Dense(48, name="gate")(x))


def test_linen_statistics_match_the_variables_by_path():
  rng = np.random.default_rng(1)
  net = _Net()
  x = jnp.asarray(rng.normal(size=(6, 10, 32)) * np.exp(rng.normal(size=32)), jnp.float32)
  variables = net.init(jax.random.key(1), x[:1])
  cal = sc.calibrate_linen(net, variables, [(x[:3],), (x[3:],)])
  assert sorted(cal.hessians) == ["params/gate/kernel", "params/up/kernel"]
  flat = x.reshape(-1, 32)
  np.testing.assert_allclose(cal.hessians["params/up/kernel"], flat.T @ flat / 60, rtol=1e-4,
                             atol=1e-4)
  rules = [("gate", sc.Budget(bits_per_weight=5.5, method="gptq"))]
  out = sc.decompose(variables, key=KEY, bits_per_weight=4, rules=rules, calibration=cal,
                     options=OPTS)
  for path, bits, method, opts in (("params/up/kernel", 4, "signed_cut", OPTS),
                                   ("params/gate/kernel", 5.5, "gptq", None)):
    leaf = out["params"][path.split("/")[1]]["kernel"]
    w = variables["params"][path.split("/")[1]]["kernel"]
    _same(leaf, sc.decompose(w, key=_tree.leaf_key(KEY, path), bits_per_weight=bits,
                             calibration=cal.hessians[path], method=method, options=opts))
  assert out["params"]["up"]["bias"] is variables["params"]["up"]["bias"]
  # leafwise: the same factors.
  _same(out, sc.decompose_leafwise(variables, key=KEY, bits_per_weight=4, rules=rules,
                                   calibration=cal, options=OPTS,
                                   progress=False))
  # A leaf without statistics gets plain cuts (the calibration options do not apply to it).
  half = sc.decompose(variables, key=KEY, bits_per_weight=4, options=OPTS,
                      calibration={"params/up/kernel": cal.hessians["params/up/kernel"]})
  _same(half["params"]["gate"]["kernel"],
        sc.decompose(variables["params"]["gate"]["kernel"], bits_per_weight=4,
                     key=_tree.leaf_key(KEY, "params/gate/kernel")))


def test_nnx_statistics_match_the_state_by_path():
  from flax import nnx  # noqa: PLC0415

  class Net(nnx.Module):
    def __init__(self):
      self.up = nnx.Linear(32, 48, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.up(x)

  net = Net()
  _, h = _problem()
  x = jnp.asarray(np.linalg.cholesky(np.asarray(h, np.float64) * 300).T, jnp.float32)  # XᵀX = 300 H
  cal = sc.calibrate(net, [(x,)])
  np.testing.assert_allclose(cal.hessians["up/kernel"], 300 * h / 32, rtol=1e-3, atol=1e-3)
  state = nnx.state(net, nnx.Param)
  out = sc.decompose(state, key=KEY, bits_per_weight=4, calibration=cal, options=OPTS)
  want = sc.decompose(state["up"]["kernel"][...], bits_per_weight=4, options=OPTS,
                      key=_tree.leaf_key(KEY, "up/kernel"), calibration=cal.hessians["up/kernel"])
  _same(out["up"]["kernel"].get_value(), want)


def test_torch_layout_statistics_compress_the_transposed_leaf():
  w, h = _problem()
  cal = sc.Calibration(hessians={"l.weight": h}, tokens=300, layout="torch")
  out = sc.decompose({"l.weight": w.T}, key=KEY, bits_per_weight=4, calibration=cal,
                     options=OPTS)
  f = out["l.weight"]
  assert isinstance(f, sc.Transposed) and f.shape == (w.shape[1], w.shape[0])
  _same(f.inner, sc.decompose(w, key=_tree.leaf_key(KEY, "l.weight"), bits_per_weight=4,
                              calibration=h, options=OPTS))


def _bad(h, **kw):
  w, _ = _problem(m=20, n=24)
  return lambda: sc.decompose(w, key=KEY, **{"bits_per_weight": 4, "calibration": h, **kw})


_, _H = _problem(m=20, n=24)


@pytest.mark.parametrize("call, match", [
    (_bad(_H[:5, :5]), r"shape \(5, 5\), but the weight \(20, 24\) \(in, out\) has 20 inputs"),
    (_bad(jnp.eye(24)), r"expected \(20, 20\) \(wrong layout\?\)"),
    (_bad(_H.at[2, 3].set(jnp.nan)), "non-finite"),
    (_bad(-_H), "not positive semidefinite"),
    (_bad(jnp.zeros((20, 20))), "all zero"),
    (_bad(_H, method="rtn"), "method 'rtn' cannot use calibration statistics"),
    (_bad(_H, options={"sparse_fraction": 2.0}), "sparse_fraction must be"),
    (_bad(_H, options={"nope": 1}), "take the options"),
    (_bad(_H, options={"search": "exact"}), r"search must be one of \('hcut', 'diag', 'plain'\)"),
    (_bad(_H, bits_per_weight=0.5), "pays for no calibrated cut"),
    (lambda: sc.decompose(_problem(m=20, n=24)[0], key=KEY, width=3, calibration=_H),
     "take a rate or bits_per_weight budget, not width=3"),
    (lambda: sc.decompose(jnp.ones((20, 24)), key=KEY, bits_per_weight=4,
                          options={"sparse_fraction": 0.1}), "only with calibration"),
    (lambda: sc.decompose({"a": jnp.ones((20, 24))}, key=KEY, bits_per_weight=4,
                          calibration={"b": _H}), r"no leaf of the tree: \['b'\]"),
    (lambda: sc.decompose({"a": jnp.ones((24, 20))}, key=KEY, bits_per_weight=4,
                          calibration={"a": _H}), r"leaf 'a': calibration statistics have shape"),
    (lambda: sc.decompose({"a": jnp.ones((20, 24)), "b": jnp.ones((20, 24))}, key=KEY,
                          bits_per_weight=8, method="gptq", calibration={"a": _H}),
     "leaf 'b' of shape .*needs calibration statistics"),
    (lambda: jax.jit(lambda w: sc.decompose(w, key=KEY, bits_per_weight=4, calibration=_H))(
        jnp.ones((20, 24))), "runs eagerly"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()




# ---------------------------------------------------------------------------------------------
# The command line: jax-signedcut compress --calibration STATS.


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
  """A two-weight torch-layout checkpoint and a statistics file for one of its weights."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  d = tmp_path_factory.mktemp("calib_cli")
  w, h = _problem()
  rng = np.random.default_rng(5)
  tensors = {"l1.weight": np.asarray(w).T.copy(),            # (out, in) = (48, 32)
             "l2.weight": rng.standard_normal((40, 33)).astype(np.float32)}
  save_file(tensors, str(d / "in.safetensors"))
  cal = sc.Calibration(hessians={"l1.weight": np.asarray(h)}, tokens=300, layout="torch")
  sc.save_calibration(d / "stats.safetensors", cal)
  return d, tensors, cal


def _cli(capsys, *argv):
  from jax_signedcut._cli.main import main  # noqa: PLC0415
  code = main([str(a) for a in argv])
  return code, *capsys.readouterr()


def test_cli_calibration_gives_the_library_factors(torch_model, tmp_path, capsys):
  from conftest import assert_same_factors  # noqa: PLC0415

  d, tensors, cal = torch_model
  out = tmp_path / "o.safetensors"
  code, _, err = _cli(capsys, "compress", d / "in.safetensors", out, "--bits", "4",
                      "--calibration", d / "stats.safetensors", "--option", "fallback=false",
                      "--option", "sparse_fraction=0.01", "-q")
  assert code == 0, err
  got = sc.load(out)
  want = sc.decompose({k: jnp.asarray(v) for k, v in tensors.items()}, key=jax.random.key(0),
                      bits_per_weight=4, calibration=sc.load_calibration(d / "stats.safetensors"),
                      options=OPTS)
  assert isinstance(got["l1.weight"], sc.Transposed)
  for name in tensors:
    assert_same_factors(want[name], got[name])
  assert sc.load_info(out)["user"]["calibration"] == "stats.safetensors"
  # GPTQ by rule on the calibrated weight; the other weight has no statistics: plain cuts.
  code, _, err = _cli(capsys, "compress", d / "in.safetensors", out, "--bits", "4",
                      "--calibration", d / "stats.safetensors", "--rule",
                      r"l1=bits=5.5,method=gptq", "-q")
  assert code == 0, err
  assert_same_factors(sc.load(out)["l1.weight"],
                      sc.Transposed(gptq.gptq(jnp.asarray(tensors["l1.weight"]).T,
                                              cal.hessians["l1.weight"], bits=4)))


def test_cli_calibration_errors(torch_model, tmp_path, capsys):
  d, _, cal = torch_model
  src, out = d / "in.safetensors", tmp_path / "o.safetensors"
  stray = tmp_path / "stray.safetensors"
  sc.save_calibration(stray, sc.Calibration({"l3.weight": cal.hessians["l1.weight"]}, 5,
                                            layout="torch"))
  flax = tmp_path / "flax.safetensors"
  sc.save_calibration(flax, cal, layout="flax")
  for argv, match in (
      (("--method", "gptq", "--bits", "4"), "--method gptq needs input statistics"),
      (("--bits", "4", "--option", "fallback=false"), "--option is for the other methods"),
      (("--bits", "4", "--calibration", stray), "no leaf of the tree: ['l3.weight']"),
      (("--bits", "4", "--calibration", flax), "(48, 32) (in, out) has 48 inputs"),
      (("--bits", "4", "--calibration", tmp_path / "none.safetensors"), "does not exist"),
      (("--method", "rtn", "--bits", "4", "--calibration", d / "stats.safetensors"),
       "method 'rtn' cannot use calibration statistics")):
    code, _, err = _cli(capsys, "compress", src, out, *argv, "-q")
    assert code != 0 and match in err, (argv, err)
    assert not out.exists()
