"""Global bit allocation (issue 14): curves, sensitivities, bits per leaf, the file field, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_signedcut as sc
from jax_signedcut._calibration import allocate, objective
from jax_signedcut._core import tree as _tree

KEY = jax.random.key(0)
# The shape and options of test_calibration_api.py (its compiled programs are not shared across
# modules, but one shape and option set keeps this module to one compilation of each step).
OPTS = {"fallback": False, "sparse_fraction": 0.01, "search": "diag"}
BUDGETS = (3.0, 4.0, 5.0)


def _problem(seed, m=32, n=48, tokens=300):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, m)) * np.exp(rng.normal(scale=2.0, size=m))
  x[:, 1] += 0.8 * x[:, 0]
  w = rng.normal(size=(m, n)) * (1 + seed)
  return np.asarray(w, np.float32), np.asarray(x.T @ x / tokens, np.float32)


@pytest.fixture(scope="module")
def kernels():
  (w1, h1), (w2, h2) = _problem(0), _problem(1)
  weights, hessians = {"a": w1, "b": w2}, {"a": h1, "b": h2}
  curves, kept = allocate.budget_curves(weights, hessians, key=lambda p: _tree.leaf_key(KEY, p),
                                        budgets=BUDGETS, options=OPTS, keep=4.0)
  return weights, hessians, curves, kept


def test_curves_are_the_kept_parts_errors_and_the_allocation_is_the_solvers_within_budget(
    kernels):
  weights, hessians, curves, kept = kernels
  for p in weights:
    bits, err2 = curves[p]
    np.testing.assert_array_equal(bits, BUDGETS)
    assert np.all(np.diff(err2) < 0)                  # more bits, less output error
    f = sc.decompose(jnp.asarray(weights[p]), key=_tree.leaf_key(KEY, p), bits_per_weight=4,
                     calibration=hessians[p], options=OPTS)
    e = float(objective.relative_output_error(weights[p], f.reconstruct(), hessians[p]))
    np.testing.assert_allclose(err2[1], e * e, rtol=2e-3)     # the prefix refit = decompose's
    np.testing.assert_allclose(kept[p], f.reconstruct(), atol=1e-3 * np.abs(weights[p]).max())
  sizes = {p: weights[p].size for p in weights}
  for sens in ({"a": 1.0, "b": 1.0}, {"a": 50.0, "b": 0.01}, {"a": 0.0, "b": 3.0}):
    got = allocate.allocate_bits(curves, sizes, 4.0, sensitivity=sens)
    assert sum(got[p] * sizes[p] for p in sizes) <= 4.0 * sum(sizes.values())
    solver = allocate.allocate({p: (b * sizes[p] / 8, e) for p, (b, e) in curves.items()},
                               4.0 * sum(sizes.values()) / 8, sensitivity=sens)
    assert got == {p: BUDGETS[i] for p, i in solver.items()}
  # A kernel that matters 5000x more gets the bits.
  assert allocate.allocate_bits(curves, sizes, 4.0, sensitivity={"a": 50.0, "b": 0.01}) \
      == {"a": 5.0, "b": 3.0}


def test_allocation_rules_give_decompose_the_allocated_bits(kernels):
  weights, hessians, _, _ = kernels
  bits = {"a": 5.0, "b": 3.0}
  tree = {k: jnp.asarray(v) for k, v in weights.items()}
  rules = allocate.allocation_rules(bits, options=OPTS)
  got = sc.decompose(tree, key=KEY, bits_per_weight=4, rules=rules, calibration=hessians)
  for p, b in bits.items():
    want = sc.decompose(tree[p], key=_tree.leaf_key(KEY, p), bits_per_weight=b,
                        calibration=hessians[p], options=OPTS)
    np.testing.assert_array_equal(got[p].reconstruct(), want.reconstruct())
    assert sc.nbytes(got[p]) <= b * weights[p].size / 8


def test_measured_sensitivities_swap_one_parameter_and_restore_it():
  class Two(nnx.Module):
    def __init__(self):
      self.l1 = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      self.l2 = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.l2(self.l1(x))

  model = Two()
  x = jnp.ones((5, 4))
  ref = np.asarray(model(x))
  old = {p: np.asarray(v) for p, v in (("l1/kernel", model.l1.kernel.get_value()),
                                      ("l2/kernel", model.l2.kernel.get_value()))}
  kept = {"l1/kernel": old["l1/kernel"] * 0.5, "l2/kernel": old["l2/kernel"] + 0.1}

  def loss(m):
    return float(np.mean((np.asarray(m(x)) - ref) ** 2))

  sens = allocate.measure_sensitivities(model, kept, loss, {"l1/kernel": 0.5, "l2/kernel": 2.0})
  for p, v in kept.items():
    manual = Two()
    (manual.l1 if p.startswith("l1") else manual.l2).kernel.set_value(jnp.asarray(v))
    np.testing.assert_allclose(sens[p], loss(manual) / (0.5 if p == "l1/kernel" else 2.0),
                               rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(model.l1.kernel.get_value()), old["l1/kernel"])
  np.testing.assert_array_equal(np.asarray(model(x)), ref)
  with pytest.raises(ValueError, match="'l3/kernel' is no parameter path"):
    allocate.measure_sensitivities(model, {"l3/kernel": old["l1/kernel"]}, loss)
  with pytest.raises(ValueError, match=r"has shape \(3, 2\), the parameter \(4, 3\)"):
    allocate.measure_sensitivities(model, {"l1/kernel": old["l2/kernel"]}, loss)


@pytest.mark.parametrize("sens, match", [
    ({"a": -1.0, "b": 1.0}, r"sensitivity of 'a' must be a finite number >= 0, got -1.0"),
    ({"a": float("nan"), "b": 1.0}, "sensitivity of 'a' must be a finite number"),
    ({"a": 1.0}, r"no sensitivity for 1 kernels with statistics: \['b'\]"),
    ({"a": 1.0, "b": 1.0, "z": 1.0}, r"sensitivities for 1 names without statistics: \['z'\]"),
])
def test_sensitivity_errors(kernels, sens, match):
  _, _, curves, _ = kernels
  with pytest.raises(ValueError, match=match):
    allocate.allocate_bits(curves, {"a": 1536, "b": 1536}, 4.0, sensitivity=sens)


def test_the_file_carries_sensitivities_under_its_names(tmp_path):
  _, h = _problem(0)
  cal = sc.Calibration({"x/kernel": h, "y/kernel": h}, 300)
  path = tmp_path / "s.safetensors"
  sc.save_calibration(path, cal, {"x/kernel": "x.weight", "y/kernel": "y.weight"}, layout="torch",
                      sensitivities={"x/kernel": 0.5, "y/kernel": 2})
  got = sc.load_calibration(path)
  assert got.sensitivities == {"x.weight": 0.5, "y.weight": 2.0}
  sc.save_calibration(path, cal)
  assert sc.load_calibration(path).sensitivities is None
  with pytest.raises(ValueError, match="no sensitivity for 1 kernels"):
    sc.save_calibration(path, cal, sensitivities={"x/kernel": 1.0})
  from safetensors.numpy import save_file  # noqa: PLC0415
  meta = {"format": "jax_signedcut.calibration", "layout": "flax", "tokens": "300"}
  for field, match in (("[1, 2]", "must be a JSON object"), ("{oops", "must be a JSON object"),
                       (json.dumps({"x": float("inf")}), "sensitivity of 'x' must be a finite"),
                       (json.dumps({"x": 1, "q": 1}), r"names without statistics: \['q'\]")):
    save_file({"x": h}, str(path), metadata={**meta, "sensitivities": field})
    with pytest.raises(ValueError, match=f"s.safetensors: .*{match}"):
      sc.load_calibration(path)


# ---------------------------------------------------------------------------------------------
# The command line: jax-signedcut compress --calibration STATS --allocate.


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory, kernels):
  from safetensors.numpy import save_file  # noqa: PLC0415

  weights, hessians, _, _ = kernels
  d = tmp_path_factory.mktemp("alloc_cli")
  rng = np.random.default_rng(5)
  tensors = {"a.weight": weights["a"].T.copy(), "b.weight": weights["b"].T.copy(),
             "c.weight": rng.standard_normal((40, 33)).astype(np.float32)}   # no statistics
  save_file(tensors, str(d / "in.safetensors"))
  cal = sc.Calibration({"a.weight": hessians["a"], "b.weight": hessians["b"]}, 300,
                       layout="torch")
  sc.save_calibration(d / "sens.safetensors", cal,
                      sensitivities={"a.weight": 50.0, "b.weight": 0.01})
  sc.save_calibration(d / "plain.safetensors", cal)
  return d, tensors, cal


def _cli(capsys, *argv):
  from jax_signedcut._cli.main import main  # noqa: PLC0415
  code = main([str(a) for a in argv])
  return code, *capsys.readouterr()


def _opts_argv():
  return [a for k, v in OPTS.items() for a in ("--option", f"{k}={str(v).lower()}")]


def test_cli_allocate_gives_the_library_bits_and_factors(torch_files, kernels, tmp_path, capsys):
  d, tensors, cal = torch_files
  _, _, curves, _ = kernels
  out = tmp_path / "o.safetensors"
  code, stdout, err = _cli(capsys, "compress", d / "in.safetensors", out, "--bits", "4",
                           "--calibration", d / "sens.safetensors", "--allocate", *_opts_argv())
  assert code == 0, err
  sizes = {"a.weight": 1536, "b.weight": 1536}
  want = allocate.allocate_bits({f"{p}.weight": c for p, c in curves.items()}, sizes, 4.0,
                                sensitivity=cal_sens(d))
  assert want == {"a.weight": 5.0, "b.weight": 3.0}
  assert sc.load_info(out)["user"]["allocation"] == want
  assert "allocation: 4 bits/weight over 2 leaves" in stdout and "a.weight  5 bits" in stdout
  got = sc.load(out)
  for p, b in want.items():
    f = sc.decompose(jnp.asarray(tensors[p]).T, key=_tree.leaf_key(KEY, p), bits_per_weight=b,
                     calibration=cal.hessians[p], options=OPTS)
    np.testing.assert_array_equal(got[p].reconstruct(), f.reconstruct().T)
  assert sum(sc.nbytes(got[p]) for p in want) <= 4 * sum(sizes.values()) / 8
  plain_c = sc.decompose(jnp.asarray(tensors["c.weight"]), key=_tree.leaf_key(KEY, "c.weight"),
                         bits_per_weight=4)
  np.testing.assert_array_equal(got["c.weight"].reconstruct(), plain_c.reconstruct())


def cal_sens(d):
  return sc.load_calibration(d / "sens.safetensors").sensitivities


def test_the_file_carries_weight_sensitivities_for_weights_without_statistics(tmp_path):
  _, h = _problem(0)
  cal = sc.Calibration({"x/kernel": h}, 300, weight_sensitivities={"emb/embedding": 0.25})
  path = tmp_path / "w.safetensors"
  sc.save_calibration(path, cal, {"x/kernel": "x.weight", "emb/embedding": "emb.weight"},
                      layout="torch", sensitivities={"x/kernel": 2.0})
  got = sc.load_calibration(path)
  assert got.sensitivities == {"x.weight": 2.0}
  assert got.weight_sensitivities == {"emb.weight": 0.25}
  sc.save_calibration(path, sc.Calibration({"x/kernel": h}, 300))
  assert sc.load_calibration(path).weight_sensitivities is None
  with pytest.raises(ValueError, match=r"weight sensitivities for 1 weights with statistics: "
                                       r"\['x/kernel'\]"):
    sc.save_calibration(path, cal, weight_sensitivities={"x/kernel": 1.0})
  with pytest.raises(ValueError, match="sensitivity of 'e' must be a finite number >= 0"):
    sc.save_calibration(path, cal, weight_sensitivities={"e": -1.0})
  from safetensors.numpy import save_file  # noqa: PLC0415
  meta = {"format": "jax_signedcut.calibration", "layout": "flax", "tokens": "300"}
  for field, match in (("[1]", "'weight_sensitivities' must be a JSON object"),
                       (json.dumps({"e": "big"}), "sensitivity of 'e' must be a finite"),
                       (json.dumps({"x": 1}), r"weights with statistics: \['x'\]")):
    save_file({"x": h}, str(path), metadata={**meta, "weight_sensitivities": field})
    with pytest.raises(ValueError, match=f"w.safetensors: .*{match}"):
      sc.load_calibration(path)


@pytest.mark.parametrize("table_sens", [1e4, 1e-6])
def test_cli_allocate_puts_a_leaf_with_a_weight_sensitivity_into_the_budget(
    torch_files, kernels, tmp_path, capsys, table_sens):
  """c.weight has no statistics; with a weight sensitivity it shares the kernels' budget,
  allocated by its plain cuts' weight-error curve (the library's curves and solver)."""
  d, tensors, cal = torch_files
  _, _, curves, _ = kernels
  stats_file = tmp_path / "ws.safetensors"
  sens = {"a.weight": 50.0, "b.weight": 0.01}
  sc.save_calibration(stats_file, cal, sensitivities=sens,
                      weight_sensitivities={"c.weight": table_sens})
  out = tmp_path / "o.safetensors"
  code, stdout, err = _cli(capsys, "compress", d / "in.safetensors", out, "--bits", "4",
                           "--calibration", stats_file, "--allocate", *_opts_argv())
  assert code == 0, err
  c_curves, _ = allocate.plain_curves({"c.weight": tensors["c.weight"]},
                                      key=lambda p: _tree.leaf_key(KEY, p), budgets=BUDGETS)
  every = {**{f"{p}.weight": v for p, v in curves.items()}, **c_curves}
  sizes = {"a.weight": 1536, "b.weight": 1536, "c.weight": 40 * 33}
  want = allocate.allocate_bits(every, sizes, 4.0,
                                sensitivity={**sens, "c.weight": table_sens})
  assert sc.load_info(out)["user"]["allocation"] == want
  assert "over 3 leaves" in stdout
  # The table's share follows its sensitivity: the most it can take, or (mattering little)
  # less, with the sensitive kernel a at its most.
  if table_sens > 1:
    assert want["c.weight"] == 5.0
  else:
    assert want["c.weight"] < 5.0 and want["a.weight"] == 5.0
  got = sc.load(out)
  plain_c = sc.decompose(jnp.asarray(tensors["c.weight"]), key=_tree.leaf_key(KEY, "c.weight"),
                         bits_per_weight=want["c.weight"])
  np.testing.assert_array_equal(got["c.weight"].reconstruct(), plain_c.reconstruct())
  assert sum(sc.nbytes(got[p]) for p in sizes) <= 4 * sum(sizes.values()) / 8


def test_cli_allocate_errors(torch_files, tmp_path, capsys):
  from safetensors.numpy import save_file  # noqa: PLC0415

  d, _, cal = torch_files
  src, out = d / "in.safetensors", tmp_path / "o.safetensors"
  meta = {"format": "jax_signedcut.calibration", "layout": "torch", "tokens": "300"}
  stray = tmp_path / "stray.safetensors"
  save_file(dict(cal.hessians), str(stray), metadata={**meta, "sensitivities": json.dumps(
      {"a.weight": 1, "b.weight": 1, "z.weight": 1})})
  typo = tmp_path / "typo.safetensors"
  sc.save_calibration(typo, cal, sensitivities={"a.weight": 1.0, "b.weight": 1.0},
                      weight_sensitivities={"cc.weight": 1.0})
  neg = tmp_path / "neg.safetensors"
  save_file(dict(cal.hessians), str(neg), metadata={**meta, "sensitivities": json.dumps(
      {"a.weight": -2, "b.weight": 1})})
  for argv, match in (
      (("--bits", "4"), "--allocate needs --calibration STATS"),
      (("--bits", "4", "--calibration", d / "plain.safetensors"),
       "plain.safetensors has no sensitivities (the metadata field 'sensitivities'"),
      (("--bits", "4", "--calibration", stray), r"names without statistics: ['z.weight']"),
      (("--bits", "4", "--calibration", neg), "sensitivity of 'a.weight' must be a finite "
       "number >= 0, got -2"),
      (("--width", "4", "--calibration", d / "sens.safetensors"), "needs a rate or bits budget"),
      (("--bits", "4", "--calibration", typo), "'weight_sensitivities' names 1 weights "
       f"{src} does not have: ['cc.weight']")):
    code, _, err = _cli(capsys, "compress", src, out, *argv, "--allocate", "-q")
    assert code != 0 and match in err, (argv, err)
    assert not out.exists()


def test_curve_argument_errors(kernels):
  weights, hessians, _, _ = kernels
  for kw, match in ((dict(budgets=BUDGETS, keep=3.5), r"keep=3.5 is not among budgets"),
                    (dict(budgets=(4.0, 3.0)), "budgets must be increasing"),
                    (dict(budgets=BUDGETS, keep=(3.0, 6.0)), "is not among budgets")):
    with pytest.raises(ValueError, match=match):
      allocate.budget_curves(weights, hessians, key=KEY, **kw)
  with pytest.raises(ValueError, match=r"must name the same kernels; differ in \['b'\]"):
    allocate.budget_curves(weights, {"a": hessians["a"]}, key=KEY, budgets=BUDGETS)
  with pytest.raises(ValueError, match=r"bits_per_weight - span \* step > 0"):
    allocate.budget_grid(1.0)
  with pytest.raises(ValueError, match=r"bits_per_weight - span \* step > 0"):
    allocate.budget_grid(2.0, span=2)
  for span in (0, True, 1.5):
    with pytest.raises(ValueError, match="span must be an integer >= 1"):
      allocate.budget_grid(4.0, span=span)


def test_budget_grid_spans_steps_around_the_target():
  assert allocate.budget_grid(4.0) == (3.0, 4.0, 5.0)
  assert allocate.budget_grid(4.0, span=2) == (2.0, 3.0, 4.0, 5.0, 6.0)
  assert allocate.budget_grid(4.0, 0.5) == (3.5, 4.0, 4.5)


def test_plain_curves_are_decomposes_errors_and_the_rules_reproduce_the_kept_table():
  """A table without statistics: its curve is its plain cuts' squared relative error."""
  rng = np.random.default_rng(3)
  table = np.asarray(rng.normal(size=(48, 32)), np.float32)
  kernel, h = _problem(0)
  key = lambda p: _tree.leaf_key(KEY, p)  # noqa: E731
  curves, kept = allocate.plain_curves({"emb": table}, key=key, budgets=BUDGETS, keep=4.0)
  bits, errs = curves["emb"]
  np.testing.assert_array_equal(bits, BUDGETS)
  for b, e in zip(BUDGETS, errs):
    f = sc.decompose(jnp.asarray(table), key=key("emb"), bits_per_weight=b)
    dense = np.asarray(f.reconstruct())
    want = np.sum((table - dense) ** 2) / np.sum(table ** 2)   # the readable reference
    np.testing.assert_allclose(e, want, rtol=1e-5)
    if b == 4.0:
      np.testing.assert_array_equal(kept["emb"], dense)
  assert errs[0] > errs[1] > errs[2] > 0
  # Beside a calibrated kernel: one allocation, and decompose with its rules gives the table
  # the very cuts the curve measured (options {} = plain cuts; the kernel keeps its options).
  kc, _ = allocate.budget_curves({"k": kernel}, {"k": h}, key=key, budgets=BUDGETS, options=OPTS)
  bits = allocate.allocate_bits({**kc, **curves}, {"k": kernel.size, "emb": table.size}, 4.0,
                                sensitivity={"k": 1.0, "emb": 1.0})
  assert bits["k"] * kernel.size + bits["emb"] * table.size <= 4.0 * (kernel.size + table.size)
  rules = allocate.allocation_rules(bits, options=lambda p: {} if p == "emb" else OPTS)
  out = sc.decompose({"k": kernel, "emb": table}, key=KEY, bits_per_weight=4, rules=rules,
                     calibration={"k": h})
  want = sc.decompose(jnp.asarray(table), key=key("emb"), bits_per_weight=bits["emb"])
  np.testing.assert_array_equal(np.asarray(out["emb"].reconstruct()),
                                np.asarray(want.reconstruct()))


def test_plain_curve_errors():
  table = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match=r"keep=3.5 is not among budgets"):
    allocate.plain_curves({"t": table}, key=KEY, budgets=BUDGETS, keep=3.5)
  with pytest.raises(ValueError, match="budgets must be increasing"):
    allocate.plain_curves({"t": table}, key=KEY, budgets=(4.0, 3.0))
  with pytest.raises(ValueError, match=r"matrix 'v' must be a non-empty 2-D array, got shape "
                                       r"\(8,\)"):
    allocate.plain_curves({"v": np.ones(8, np.float32)}, key=KEY, budgets=BUDGETS)


def _gptq_error2(w, h, bits):
  """Readable reference: tr(EᵀHE) / tr(WᵀHW) of GPTQ's int-b kernel, in float64."""
  q = np.asarray(sc.decompose(jnp.asarray(w), key=KEY, method="gptq", calibration=h,
                              bits_per_weight=sc.rtn_bits_per_weight(w.shape[1], w.shape[0],
                                                                     bits)).reconstruct(),
                 np.float64)
  e, h64, w64 = q - w, np.asarray(h, np.float64), np.asarray(w, np.float64)
  return np.trace(e.T @ h64 @ e) / np.trace(w64.T @ h64 @ w64)


def test_gptq_curves_and_the_method_chosen_per_matrix(kernels):
  """GPTQ's curve is its stored bits and output error under H; merged with the cuts' curve,
  the allocation chooses method and bits per kernel, and the rules reproduce both."""
  weights, hessians, curves, _ = kernels
  g, kept = allocate.gptq_curves(weights, hessians, codes=(3, 4), keep=4)
  for p in weights:
    bits, err2 = g[p]
    np.testing.assert_allclose(bits, [sc.rtn_bits_per_weight(48, 32, b) for b in (3, 4)])
    for b, e2 in zip((3, 4), err2):
      np.testing.assert_allclose(e2, _gptq_error2(weights[p], hessians[p], b), rtol=1e-4)
    assert kept[p].shape == weights[p].shape
  merged, methods = allocate.merge_curves({"signed_cut": curves, "gptq": g,
                                           "none": {"a": (np.array([3.0]), np.array([9.0]))}})
  for p in weights:
    bits, err2 = merged[p]
    assert np.all(np.diff(bits) > 0)
    # The union of the options (at in = 32 GPTQ's scales cost 1 bit: int3 is 4.0 bits, the
    # cuts' 4-bit option); at equal bits the lower error and its method stay.
    options = {}
    for method, c in (("signed_cut", curves[p]), ("gptq", g[p])) + (
        (("none", (np.array([3.0]), np.array([9.0]))),) if p == "a" else ()):
      for b, e in zip(*c):
        if float(b) not in options or e < options[float(b)][0]:
          options[float(b)] = (float(e), method)
    assert list(bits) == sorted(options)
    assert [(float(e), methods[p][float(b)]) for b, e in zip(bits, err2)] == [
        options[b] for b in sorted(options)]
  sizes = {p: weights[p].size for p in weights}
  got = allocate.allocate_bits(merged, sizes, 4.0, sensitivity={"a": 1.0, "b": 1.0})
  assert sum(got[p] * sizes[p] for p in sizes) <= 4.0 * sum(sizes.values())
  chosen = {p: methods[p][got[p]] for p in got}
  rules = allocate.allocation_rules(got, options=lambda p: OPTS if chosen[p] == "signed_cut"
                                    else {}, method=chosen.get)
  out = sc.decompose(weights, key=KEY, bits_per_weight=4, calibration=hessians, rules=rules)
  for p in weights:
    is_gptq = bool(isinstance(out[p], sc.Transposed)
                   and isinstance(out[p].inner, sc.QuantizedMatrix))
    assert is_gptq == (chosen[p] == "gptq"), (p, chosen[p], type(out[p]))
    assert 8 * sc.nbytes(out[p]) <= got[p] * sizes[p] + 1e-6
  # One kernel forced to GPTQ by the curve: at 100x the cuts' error the solver takes GPTQ.
  worse = dict(merged)
  b, e = merged["a"]
  worse["a"] = (b, np.where([methods["a"][x] == "signed_cut" for x in b], e * 100, e))
  got = allocate.allocate_bits(worse, sizes, 4.0)
  assert methods["a"][got["a"]] == "gptq"


@pytest.mark.parametrize("codes, match", [((4, 3), "increasing integers"), ((1, 2), "2..8"),
                                          ((3.5,), "integers"), ((), "increasing")])
def test_gptq_curve_errors(kernels, codes, match):
  weights, hessians, _, _ = kernels
  with pytest.raises(ValueError, match=match):
    allocate.gptq_curves(weights, hessians, codes=codes)
  with pytest.raises(ValueError, match="keep=5"):
    allocate.gptq_curves(weights, hessians, codes=(3, 4), keep=5)
  with pytest.raises(ValueError, match="same kernels"):
    allocate.gptq_curves(weights, {"a": hessians["a"]}, codes=(3,))


def test_cli_allocate_gptq_chooses_the_method_per_leaf(torch_files, kernels, tmp_path, capsys):
  """--allocate-gptq: the CLI's choice of method and bits is the library's (cuts' and GPTQ's
  curves merged, the same solver), and each leaf is what decompose makes with that choice."""
  d, tensors, cal = torch_files
  _, _, curves, _ = kernels
  out = tmp_path / "g.safetensors"
  code, stdout, err = _cli(capsys, "compress", d / "in.safetensors", out, "--bits", "4",
                           "--calibration", d / "sens.safetensors", "--allocate",
                           "--allocate-gptq", *_opts_argv())
  assert code == 0, err
  ws = {p: np.asarray(tensors[p]).T for p in ("a.weight", "b.weight")}
  g, _ = allocate.gptq_curves(ws, {p: cal.hessians[p] for p in ws}, codes=(3, 4, 5))
  merged, methods = allocate.merge_curves(
      {"signed_cut": {f"{p}.weight": c for p, c in curves.items()}, "gptq": g})
  sizes = {"a.weight": 1536, "b.weight": 1536}
  want = allocate.allocate_bits(merged, sizes, 4.0, sensitivity=cal_sens(d))
  saved = sc.load_info(out)["user"]["allocation"]
  got = sc.load(out)
  for p, b in want.items():
    if methods[p][b] == "gptq":
      assert saved[p] == {"bits": b, "method": "gptq"} and f"{p}  {b:g} bits  gptq" in stdout
      ref = sc.decompose(jnp.asarray(ws[p]), key=KEY, method="gptq", bits_per_weight=b,
                         calibration=cal.hessians[p])
      np.testing.assert_allclose(np.asarray(got[p].reconstruct()),
                                 np.asarray(ref.reconstruct()).T, rtol=1e-6, atol=1e-7)
    else:
      assert saved[p] == b
  assert "gptq" in {methods[p][b] for p, b in want.items()}     # the test covers that branch
  assert sum(sc.nbytes(got[p]) for p in want) <= 4 * sum(sizes.values()) / 8
  code, _, err = _cli(capsys, "compress", d / "in.safetensors", out, "--bits", "4",
                      "--calibration", d / "sens.safetensors", "--allocate-gptq")
  assert code != 0 and "--allocate-gptq needs --allocate" in err


def test_allocate_never_buys_more_error():
  """An option with more bytes and no less error (e.g. another method's, merged in) is not
  taken, even with budget to spare."""
  curves = {"a": (np.array([1.0, 2.0, 2.1]), np.array([5.0, 1.0, 1.5])),
            "b": (np.array([1.0, 2.0]), np.array([4.0, 4.0]))}
  assert allocate.allocate(curves, 100.0) == {"a": 1, "b": 0}


def test_gptq_codes_of_a_budget_grid():
  assert allocate.gptq_codes((3.0, 4.0, 5.0)) == (3, 4, 5)
  assert allocate.gptq_codes((0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5)) == (2, 3, 4)
  assert allocate.gptq_codes((8.0, 9.0)) == (8,)
  with pytest.raises(ValueError, match=r"\(0.5, 1.0\) bits per weight hold no GPTQ code"):
    allocate.gptq_codes((0.5, 1.0))
