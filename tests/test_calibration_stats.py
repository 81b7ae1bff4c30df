"""Input statistics: accumulation against explicit XᵀX, the file format and its validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_signedcut._calibration import stats


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(5, 7, rngs=rngs)
    self.b = nnx.Linear(7, 3, rngs=rngs)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


class _Masked(nnx.Module):
  """A model taking (x, mask), as BERT does."""

  def __init__(self, net):
    self.net = net

  def __call__(self, x, mask):
    del mask
    return self.net(x)


def _batches(key, n=3, shape=(2, 4, 5)):
  keys = jax.random.split(key, n)
  xs = [jax.random.normal(k, shape) for k in keys]
  masks = [(jax.random.uniform(k, shape[:-1]) > 0.3).astype(jnp.int32) for k in keys]
  return xs, masks


def _explicit(rows):
  x = np.concatenate([np.asarray(r, np.float64) for r in rows])
  return x.T @ x / len(x), len(x)


def test_nnx_matches_explicit_moments_with_mask():
  net = _Net(nnx.Rngs(0))
  xs, masks = _batches(jax.random.key(1))
  cal = stats.calibrate(_Masked(net), list(zip(xs, masks)), token_mask=lambda b: b[1])
  keep = [np.asarray(x)[np.asarray(m) > 0] for x, m in zip(xs, masks)]
  h_a, n = _explicit(keep)
  hidden = [np.tanh(np.asarray(net.a(jnp.asarray(k)))) for k in keep]
  h_b, _ = _explicit(hidden)
  assert cal.tokens == n and cal.layout == "flax"
  np.testing.assert_allclose(cal.hessians["net/a/kernel"], h_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cal.hessians["net/b/kernel"], h_b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cal.means["net/a/kernel"], np.concatenate(keep).mean(0), rtol=1e-5,
                             atol=1e-6)


def test_bias_correction_keeps_the_mean_output():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 4)) + 2.0
  w = rng.normal(size=(4, 3))
  w_hat = w + rng.normal(size=(4, 3)) * 0.3
  corr = np.asarray(stats.bias_correction(x.mean(0), jnp.asarray(w, jnp.float32),
                                          jnp.asarray(w_hat, jnp.float32)))
  np.testing.assert_allclose((x @ w_hat + corr).mean(0), (x @ w).mean(0), rtol=1e-4, atol=1e-4)


def test_nnx_model_with_mask_argument_and_paths():
  model = _Masked(_Net(nnx.Rngs(0)))
  xs, masks = _batches(jax.random.key(2), n=2)
  cal = stats.calibrate(model, list(zip(xs, masks)), token_mask=lambda b: b[1])
  assert sorted(cal.hessians) == ["net/a/kernel", "net/b/kernel"]
  assert cal.tokens == int(sum(int(m.sum()) for m in masks))


def test_linen_matches_explicit_moments():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      hidden = jnp.tanh(nn.Dense(7)(x))         # Dense_0 (5 -> 7)
      return nn.Dense(3)(hidden)                 # Dense_1 (7 -> 3)

  xs, _ = _batches(jax.random.key(3), n=2)
  module = Net()
  variables = module.init(jax.random.key(0), xs[0])
  cal = stats.calibrate_linen(module, variables, [(x,) for x in xs])
  h, n = _explicit([np.asarray(x).reshape(-1, 5) for x in xs])
  assert cal.tokens == n
  np.testing.assert_allclose(cal.hessians["params/Dense_0/kernel"], h, rtol=1e-5, atol=1e-6)
  assert cal.hessians["params/Dense_1/kernel"].shape == (7, 7)


def test_bad_mask_and_empty_batches():
  net = _Net(nnx.Rngs(0))
  x = jnp.ones((2, 4, 5))
  with pytest.raises(ValueError, match="token mask has shape"):
    stats.calibrate(net, [(x,)], token_mask=lambda b: jnp.ones((3,)))
  with pytest.raises(ValueError, match="batches is empty"):
    stats.calibrate(net, [])
  with pytest.raises(ValueError, match="zero tokens"):
    stats.calibrate(net, [(x,)], token_mask=lambda b: jnp.zeros((2, 4)))


def _cal():
  a = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
  return stats.Calibration(hessians={"w": a.T @ a / 20}, tokens=20, layout="flax")


def test_file_round_trip_and_names(tmp_path):
  path = tmp_path / "cal.safetensors"
  stats.save_calibration(path, _cal(), {"w": "encoder.weight"}, layout="torch")
  back = stats.load_calibration(path)
  assert back.layout == "torch" and back.tokens == 20 and list(back.hessians) == ["encoder.weight"]
  np.testing.assert_allclose(back.hessians["encoder.weight"], _cal().hessians["w"], rtol=1e-6)
  assert back.for_weight("encoder.weight", (9, 4)).shape == (4, 4)      # torch: (out, in)
  with pytest.raises(ValueError, match="wrong layout"):
    back.for_weight("encoder.weight", (4, 9))
  with pytest.raises(KeyError, match="no calibration statistics"):
    back.for_weight("other", (9, 4))


def _write(path, tensors, metadata):
  from safetensors.numpy import save_file
  save_file(tensors, str(path), metadata=metadata)


GOOD = {"format": stats.FORMAT, "layout": "flax", "tokens": "20"}


@pytest.mark.parametrize("tensor, metadata, match", [
    (np.eye(3, dtype=np.float32), {**GOOD, "format": "other"}, "format"),
    (np.eye(3, dtype=np.float32), {**GOOD, "layout": "jax"}, "layout"),
    (np.eye(3, dtype=np.float32), {**GOOD, "tokens": "0"}, "tokens"),
    (np.eye(3, dtype=np.float32), {**GOOD, "tokens": "many"}, "tokens"),
    (np.ones((3, 4), np.float32), GOOD, "square"),
    (np.full((3, 3), np.nan, np.float32), GOOD, "non-finite"),
    (np.diag([1.0, -1.0, 1.0]).astype(np.float32), GOOD, "positive semidefinite"),
    (np.triu(np.ones((3, 3), np.float32)), GOOD, "symmetric"),
])
def test_reader_rejects_bad_files(tmp_path, tensor, metadata, match):
  path = tmp_path / "bad.safetensors"
  _write(path, {"layer.weight": tensor}, metadata)
  with pytest.raises(ValueError, match=match) as e:
    stats.load_calibration(path)
  assert "bad.safetensors" in str(e.value)


def test_reader_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    stats.load_calibration(tmp_path / "nope.safetensors")


def _tiny_bert():
  from jax_signedcut.models import bert  # noqa: PLC0415

  cfg = bert.BertConfig(vocab_size=30, hidden_size=16, num_layers=1, num_heads=2,
                        intermediate_size=24, max_position=12)
  return bert, cfg, bert.Bert(cfg, rngs=nnx.Rngs(0))


def test_bert_statistics_exclude_padding_and_name_hf_weights():
  bert, cfg, model = _tiny_bert()
  ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
  mask = (ids != 0).astype(jnp.int32)
  cal = stats.calibrate(model, [(ids, mask)], token_mask=lambda b: b[1])
  assert cal.tokens == 7 and len(cal.hessians) == 6
  assert cal.hessians["layers/0/output/kernel"].shape == (24, 24)
  # Padding changes nothing: the same texts padded further give the same statistics.
  ids2 = jnp.pad(ids, ((0, 0), (0, 4)))
  cal2 = stats.calibrate(model, [(ids2, (ids2 != 0).astype(jnp.int32))], token_mask=lambda b: b[1])
  np.testing.assert_allclose(cal2.hessians["layers/0/query/kernel"],
                             cal.hessians["layers/0/query/kernel"], rtol=1e-4, atol=1e-6)
  names = bert.hf_kernel_names(cfg)
  assert names["layers/0/query/kernel"] == "encoder.layer.0.attention.self.query.weight"
  assert set(names) == set(cal.hessians)


def test_sentence_embedding_has_finite_gradients_with_an_all_padding_row():
  """The padded rows of a short last batch give zero embeddings and zero, not NaN, gradients."""
  bert, _, model = _tiny_bert()
  ids = jnp.array([[1, 5, 7, 2, 0, 0], [0, 0, 0, 0, 0, 0]])
  mask = (ids != 0).astype(jnp.int32)
  emb = bert.sentence_embedding(model, ids, mask)
  np.testing.assert_array_equal(np.asarray(emb[1]), 0.0)
  x = model(ids, mask)
  mean = jnp.sum(x[0, :4], axis=0) / 4
  np.testing.assert_allclose(emb[0], mean / jnp.linalg.norm(mean), rtol=1e-6, atol=1e-7)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    return jnp.sum(bert.sentence_embedding(nnx.merge(graphdef, p), ids, mask) ** 2)

  grads = jax.tree.leaves(jax.grad(loss)(params))
  assert grads and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
