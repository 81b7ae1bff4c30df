"""Scale distillation: train the float parts of a compressed model against the original.

The sign bits S, T of every signed cut (and every index, count and code) stay
exactly as compressed; what is trained, by gradient descent (optax Adam,
cosine-decayed learning rate), is what a compressed layer holds as floats:

* the per-cut scales ``c`` of each :class:`~jax_signedcut.SignedCut`, as
  ``c₀ (1 + u)``;
* the values of each :class:`~jax_signedcut.Sparse` part, as ``v₀ (1 + u)``;
* the input-channel scales of each :class:`~jax_signedcut.InputScaled`, as
  ``d₀ exp(u)`` (they stay > 0, as the format requires);
* the absmax scales of each :class:`~jax_signedcut.QuantizedMatrix` (RTN, GPTQ:
  one per row or group), as ``s₀ (1 + u)`` (``"quant_scales"``), so that an
  int-b model can be distilled on the same terms as the cuts;
* every ``nnx.Param`` of at most one dimension (biases, LayerNorm scales and
  offsets), as ``p₀ + u``.

All of them start at ``u = 0`` (the compressed model), so one learning rate is a
relative step for the multiplicative ones. Unused slots (``c`` past
``num_cuts``, sparse values past ``count``) hold 0 and ``0·(1 + u)`` keeps them
0, so the result stays a valid compressed value of the same bytes but for the
trained floats: :func:`jax_signedcut.save` / ``load`` round-trip it. Dense
matrices (embedding tables reconstructed from their factors, kernels kept
dense) are not trained.

The loss compares the student's ``outputs(model, batch)`` with the teacher's
(computed once per batch): by default the mean over the output leaves of the
relative squared error ``‖s − t‖² / ‖t‖²``. With ``dense=True`` (the default)
each step rebuilds every kernel densely as ``Sᵀdiag(c)T`` from ±1 matrices
unpacked once: at training batch sizes (a thousand tokens) that is cheaper than
the factored product, whose cost is w·(m + n) per token against m·n. With
``dense=False`` the layers' own product runs, and the gradients for ``c`` come
from the apply kernel's custom VJP (``jax_signedcut._kernels.apply``).

Training ``c`` gives up prefix consistency: the first k cuts of the result are
not the distilled k-cut model (truncate before distilling).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_signedcut._core import checks as _checks
from jax_signedcut._core import keypath as _keypath
from jax_signedcut._core.protocol import Compressed, is_compressed
from jax_signedcut._methods.rtn import QuantizedMatrix
from jax_signedcut._parts.blocks import RowBlocks
from jax_signedcut._parts.scaled import InputScaled, Transposed
from jax_signedcut._parts.sparse import Sparse
from jax_signedcut._parts.sum import Sum
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut.factors import SignedCut

#: What ``distill`` can train (its ``train`` argument).
TRAINABLE = ("cuts", "sparse", "input_scales", "quant_scales", "vectors")

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class DistillResult:
  """What :func:`distill` did.

  Attributes:
    loss: (steps,) training loss of each step (before its update).
    dev_loss: (k,) loss on ``dev_batches`` at ``dev_steps`` (empty without them).
    dev_steps: (k,) the step counts at which ``dev_loss`` was measured (0: the
      compressed model before training).
    best_step: the step count whose parameters were kept (``steps`` without
      ``dev_batches``; the lowest ``dev_loss`` with them).
    trained: the number of trained floats.
  """

  loss: np.ndarray
  dev_loss: np.ndarray
  dev_steps: np.ndarray
  best_step: int
  trained: int


def _default_outputs(model, batch):
  return model(*batch) if isinstance(batch, tuple) else model(batch)


def relative_squared_error(student_out, teacher_out, batch=None) -> jax.Array:
  """Mean over the output leaves of ``‖s − t‖² / ‖t‖²`` (the default loss of :func:`distill`)."""
  del batch
  s_leaves, t_leaves = jax.tree.leaves(student_out), jax.tree.leaves(teacher_out)
  terms = [jnp.sum(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32)))
           / jnp.maximum(jnp.sum(jnp.square(t.astype(jnp.float32))), 1e-30)
           for s, t in zip(s_leaves, t_leaves, strict=True)]
  return sum(terms) / len(terms)


# --- trainable floats of one compressed value ------------------------------------------------


def _compressed_floats(f, prefix: str, train: frozenset, out: dict) -> None:
  """Adds ``{name: initial u}`` for the trainable floats of compressed value ``f``."""
  if isinstance(f, SignedCut):
    if "cuts" in train:
      out[prefix + "c"] = jnp.zeros_like(f.c, jnp.float32)
  elif isinstance(f, Sparse):
    if "sparse" in train:
      out[prefix + "val"] = jnp.zeros_like(f.val, jnp.float32)
  elif isinstance(f, QuantizedMatrix):
    if "quant_scales" in train:
      out[prefix + "scale"] = jnp.zeros_like(f.scale, jnp.float32)
  elif isinstance(f, InputScaled):
    if "input_scales" in train:
      out[prefix + "scale"] = jnp.zeros_like(f.scale, jnp.float32)
    _compressed_floats(f.inner, prefix + "inner/", train, out)
  elif isinstance(f, Transposed):
    _compressed_floats(f.inner, prefix + "inner/", train, out)
  elif isinstance(f, (Sum, RowBlocks)):
    for i, p in enumerate(f.parts):
      _compressed_floats(p, f"{prefix}parts/{i}/", train, out)


def _apply_floats(f, prefix: str, u: dict):
  """``f`` with its trainable floats moved by ``u`` (names as ``_compressed_floats``)."""
  if isinstance(f, SignedCut):
    d = u.get(prefix + "c")
    return f if d is None else dataclasses.replace(f, c=(f.c * (1 + d)).astype(f.c.dtype))
  if isinstance(f, Sparse):
    d = u.get(prefix + "val")
    return f if d is None else dataclasses.replace(f, val=(f.val * (1 + d)).astype(f.val.dtype))
  if isinstance(f, QuantizedMatrix):
    d = u.get(prefix + "scale")
    return f if d is None else dataclasses.replace(
        f, scale=(f.scale * (1 + d)).astype(f.scale.dtype))
  if isinstance(f, InputScaled):
    d = u.get(prefix + "scale")
    scale = f.scale if d is None else (f.scale * jnp.exp(d)).astype(f.scale.dtype)
    return InputScaled(scale, _apply_floats(f.inner, prefix + "inner/", u))
  if isinstance(f, Transposed):
    return Transposed(_apply_floats(f.inner, prefix + "inner/", u))
  if isinstance(f, Sum):
    return Sum(tuple(_apply_floats(p, f"{prefix}parts/{i}/", u) for i, p in enumerate(f.parts)))
  if isinstance(f, RowBlocks):
    return RowBlocks(f.perm, tuple(_apply_floats(p, f"{prefix}parts/{i}/", u)
                                   for i, p in enumerate(f.parts)))
  return f


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DenseKernel(Compressed):
  """A training stand-in: the dense (m, n) kernel of a compressed value, as a part."""

  w: jax.Array

  @property
  def shape(self):
    return tuple(self.w.shape[-2:])

  @property
  def batch_shape(self):
    return tuple(self.w.shape[:-2])

  def _dense(self):
    return self.w

  def stored_bytes(self):
    return jnp.int32(0)

  def _matmul(self, x2, precision=None):  # f32 at every level
    return jnp.matmul(x2, self.w, precision=_HI)


def _signs(f, prefix: str, out: dict) -> None:
  """``{prefix: (S, T)}``: the ±1 f32 matrices (w, m), (w, n) of every signed cut in ``f``."""
  if isinstance(f, SignedCut):
    if f.batch_shape:
      raise ValueError(f"distill needs one matrix per layer, got signed cuts of batch shape "
                       f"{f.batch_shape} at {prefix.rstrip('/')}")
    m, n = f.shape
    out[prefix] = (_packing.unpack_signs(f.s_bits, m), _packing.unpack_signs(f.t_bits, n))
  elif isinstance(f, (InputScaled, Transposed)):
    _signs(f.inner, prefix + "inner/", out)
  elif isinstance(f, (Sum, RowBlocks)):
    for i, p in enumerate(f.parts):
      _signs(p, f"{prefix}parts/{i}/", out)


def _dense_of(f, prefix: str, signs: dict):
  """The dense kernel of ``f`` (already moved by ``u``), signed cuts from precomputed signs."""
  if isinstance(f, SignedCut):
    s, t = signs[prefix]
    return jnp.matmul(s.T * f.c.astype(jnp.float32)[None, :], t, precision=_HI)
  if isinstance(f, InputScaled):
    return _dense_of(f.inner, prefix + "inner/", signs) / f.scale[:, None]
  if isinstance(f, Transposed):
    return _dense_of(f.inner, prefix + "inner/", signs).T
  if isinstance(f, Sum):
    parts = [_dense_of(p, f"{prefix}parts/{i}/", signs) for i, p in enumerate(f.parts)]
    return sum(parts[1:], parts[0])
  if isinstance(f, RowBlocks):
    stacked = jnp.concatenate([_dense_of(p, f"{prefix}parts/{i}/", signs)
                               for i, p in enumerate(f.parts)], axis=0)
    return stacked[jnp.argsort(f.perm)]
  return f.reconstruct(jnp.float32)


# --- the model's trainable state -------------------------------------------------------------


class _Trainable:
  """The student split into its graph, its states and the trainable floats ``u``."""

  def __init__(self, student, train: frozenset, only: str | None, dense: bool):
    from jax_signedcut.nnx import PackedFactor  # noqa: PLC0415  (nnx imports the kernels)
    self.graphdef, self.packed, self.params, self.rest = nnx.split(
        student, PackedFactor, nnx.Param, ...)
    pattern = None if only is None else re.compile(only)
    self.u: dict[str, jax.Array] = {}
    #: With ``dense``: the ±1 matrices of every signed cut, computed once (arguments of
    #: the compiled step, not constants in it).
    self.signs: dict[str, tuple] = {}
    self.num_compressed = 0
    for kp, f in jax.tree_util.tree_flatten_with_path(self.packed, is_leaf=is_compressed)[0]:
      if not is_compressed(f):
        continue
      self.num_compressed += 1
      path = "packed:" + _keypath.leaf_path(kp) + "/"
      if pattern is None or pattern.search(path[len("packed:"):]):
        _compressed_floats(f, path, train, self.u)
      if dense:
        _signs(f, path, self.signs)
    if "vectors" in train:
      for kp, p in jax.tree_util.tree_flatten_with_path(self.params)[0]:
        path = _keypath.leaf_path(kp)
        if p.ndim <= 1 and jnp.issubdtype(p.dtype, jnp.floating) \
            and (pattern is None or pattern.search(path)):
          self.u["param:" + path] = jnp.zeros_like(p, jnp.float32)



def _states(packed, params, u, signs=None):
  """(packed, params) states with ``u`` applied; with ``signs`` the kernels as dense parts."""
  def packed_leaf(kp, f):
    if not is_compressed(f):
      return f
    prefix = "packed:" + _keypath.leaf_path(kp) + "/"
    f = _apply_floats(f, prefix, u)
    return f if signs is None else _DenseKernel(_dense_of(f, prefix, signs))

  def param_leaf(kp, p):
    d = u.get("param:" + _keypath.leaf_path(kp))
    return p if d is None else (p + d).astype(p.dtype)

  return (jax.tree_util.tree_map_with_path(packed_leaf, packed, is_leaf=is_compressed),
          jax.tree_util.tree_map_with_path(param_leaf, params))


@functools.lru_cache(maxsize=8)
def _compiled(graphdef, outputs, loss_fn, lr: float, steps: int):
  """(optimizer, jitted step, jitted loss) for one model graph: blocks of one shape share them."""
  import optax  # noqa: PLC0415  (a dependency of flax)

  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def objective(u, frozen, batch, target):
    packed, params, rest, signs = frozen
    out = outputs(nnx.merge(graphdef, *_states(packed, params, u, signs), rest), batch)
    if jax.tree.structure(out) != jax.tree.structure(target) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(target))):
      raise ValueError("the student's outputs and the teacher's differ in structure or shape: "
                       f"{jax.tree.map(jnp.shape, out)} vs {jax.tree.map(jnp.shape, target)}")
    return loss_fn(out, target, batch)

  @jax.jit
  def step(u, state, frozen, batch, target):
    value, grad = jax.value_and_grad(objective)(u, frozen, batch, target)
    # optax mixes Python floats with int32 step counts: under strict promotion only.
    with jax.numpy_dtype_promotion("standard"):
      updates, state = opt.update(grad, state, u)
      return optax.apply_updates(u, updates), state, value

  def init(u):
    with jax.numpy_dtype_promotion("standard"):
      return opt.init(u)

  return init, step, jax.jit(objective)


def _check_structure(student, teacher) -> None:
  """Same modules at the same paths; a teacher ``nnx.Linear`` may be a student ``SignedCutDense``."""
  from jax_signedcut.nnx import SignedCutDense  # noqa: PLC0415
  if not isinstance(student, nnx.Module) or not isinstance(teacher, nnx.Module):
    raise TypeError(f"student and teacher must be nnx.Module, got {type(student).__name__} and "
                    f"{type(teacher).__name__}")
  s_mods = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(student)}
  t_mods = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(teacher)}
  if set(s_mods) != set(t_mods):
    only_s, only_t = sorted(set(s_mods) - set(t_mods)), sorted(set(t_mods) - set(s_mods))
    raise ValueError(f"student and teacher have different modules: only in the student "
                     f"{only_s[:5]}, only in the teacher {only_t[:5]}")
  for path, sm in s_mods.items():
    tm = t_mods[path]
    if isinstance(sm, SignedCutDense) and type(tm) is nnx.Linear:
      shape = tuple(sm.factors.batch_shape) + tuple(sm.factors.shape)
      if shape != tuple(tm.kernel.shape):
        raise ValueError(f"student and teacher differ at {path or '<root>'}: compressed kernel "
                         f"{shape}, teacher kernel {tuple(tm.kernel.shape)}")
    elif type(sm) is not type(tm):
      raise ValueError(f"student and teacher differ at {path or '<root>'}: "
                       f"{type(sm).__name__} vs {type(tm).__name__}")


def _check_batches(name, batches):
  if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence):
    raise TypeError(f"{name} must be a list (sequence) of batches, got {type(batches).__name__}")
  batches = list(batches)
  if not batches:
    raise ValueError(f"{name} is empty: distillation needs at least one batch")
  return batches


def _targets(name, given, batches, make):
  if given is None:
    return [make(b) for b in batches]
  given = _check_batches(name, given)
  if len(given) != len(batches):
    raise ValueError(f"{name} must hold one teacher output per batch: {len(batches)} batches, "
                     f"{len(given)} {name}")
  return given


def distill(student: nnx.Module, teacher: nnx.Module, batches, *, steps: int,
            lr: float = 1e-3, key=None, outputs: Callable | None = None,
            loss: Callable | None = None, train: Sequence[str] = TRAINABLE,
            only: str | None = None, dev_batches=None, eval_every: int | None = None,
            targets=None, dev_targets=None, dense: bool = True,
            progress: Callable | None = None) -> DistillResult:
  """Trains the float parts of a compressed NNX model to match the original's outputs.

  S, T (and every index, count and code) are left bit for bit; see the module
  docstring for what is trained and how. The student is updated in place.

  Args:
    student: the compressed model (``SignedCutDense`` layers, e.g. from
      :func:`jax_signedcut.nnx.swap_linears`).
    teacher: the original model, same modules (``nnx.Linear`` where the
      student has ``SignedCutDense``); not changed.
    batches: a non-empty list of batches; a tuple batch is called as
      ``model(*batch)``.
    steps: optimizer steps ≥ 1 (one batch each).
    lr: Adam's peak learning rate, finite > 0 (cosine-decayed to 0).
    key: a ``jax.random.key`` shuffling the batch order each pass; None: in order.
    outputs: ``outputs(model, batch)`` → pytree of arrays to match (default the
      model's output; a model's hidden states for block-wise losses).
    loss: ``loss(student_out, teacher_out, batch)`` → scalar (default
      :func:`relative_squared_error`).
    train: which floats to train, a subset of :data:`TRAINABLE`.
    only: regex; only floats of leaves whose path matches are trained
      (``"layers/0/"``: one block).
    dev_batches: optional held-out batches; the parameters with the lowest
      loss on them (measured every ``eval_every`` steps and at 0) are kept.
    eval_every: steps between dev measurements (default ``max(1, steps // 10)``).
    targets: optional list, one teacher output per batch, used instead of
      ``outputs(teacher, batch)`` (block-wise distillation: the teacher block's
      output on the teacher's own inputs while the student block sees the
      compressed model's); ``dev_targets`` the same for ``dev_batches``.
    dense: train through dense kernels rebuilt each step from the ±1 matrices of
      the cuts (unpacked once; memory w·(m + n) floats per kernel) rather than
      through the layers' factored product (the apply kernel and its custom VJP).
    progress: called as ``progress(step, loss)`` after each step.

  Returns:
    :class:`DistillResult`.

  Raises:
    TypeError: student/teacher not NNX modules, batches not a list, ``key`` not a key.
    ValueError: student and teacher modules differ, empty batches, ``steps < 1``,
      non-finite or non-positive ``lr``, an unknown ``train`` entry, nothing to
      train, outputs of different structure, a non-finite loss.
  """
  steps = _checks.integer("steps", steps, minimum=1)
  lr = _checks.real("lr", lr)
  bad = sorted(set(train) - set(TRAINABLE)) if not isinstance(train, str) else [train]
  if bad:
    raise ValueError(f"train must be a sequence of some of {TRAINABLE}, got unknown {bad}")
  batches = _check_batches("batches", batches)
  dev = None if dev_batches is None else _check_batches("dev_batches", dev_batches)
  eval_every = max(1, steps // 10) if eval_every is None else _checks.integer(
      "eval_every", eval_every, minimum=1)
  key = None if key is None else _checks.key("key", key)
  _check_structure(student, teacher)
  outputs = _default_outputs if outputs is None else outputs
  loss_fn = relative_squared_error if loss is None else loss

  tr = _Trainable(student, frozenset(train), only, dense)
  if not tr.u:
    raise ValueError(f"nothing to train: no {list(train)} floats"
                     + ("" if only is None else f" in leaves matching only={only!r}")
                     + f" ({tr.num_compressed} compressed kernels in the student)")
  teacher_out = nnx.jit(outputs)
  targets = _targets("targets", targets, batches, lambda b: teacher_out(teacher, b))
  if dev is not None:
    dev_targets = _targets("dev_targets", dev_targets, dev, lambda b: teacher_out(teacher, b))

  init, step, evaluate = _compiled(tr.graphdef, outputs, loss_fn, lr, steps)
  frozen = (tr.packed, tr.params, tr.rest, tr.signs if dense else None)

  def dev_loss(u):
    return float(np.mean([evaluate(u, frozen, b, t) for b, t in zip(dev, dev_targets)]))

  u, state = tr.u, init(tr.u)
  best_u, best_step, dev_hist, dev_at = u, 0, [], []
  if dev is not None:
    dev_hist.append(dev_loss(u))
    dev_at.append(0)
  history = []
  order = np.arange(len(batches))
  for i in range(steps):
    pos = i % len(batches)
    if pos == 0 and key is not None:
      order = np.asarray(jax.random.permutation(jax.random.fold_in(key, i // len(batches)),
                                                len(batches)))
    b = int(order[pos])
    u, state, value = step(u, state, frozen, batches[b], targets[b])
    value = float(value)
    if not math.isfinite(value):
      raise ValueError(f"the distillation loss is not finite ({value}) at step {i} (batch "
                       f"{b}): lower lr (now {lr:g}), or check that outputs(model, batch) has "
                       f"finite gradients on that batch (e.g. no norm of a zero row)")
    history.append(value)
    if progress is not None:
      progress(i + 1, value)
    if dev is not None and ((i + 1) % eval_every == 0 or i + 1 == steps):
      dev_hist.append(dev_loss(u))
      dev_at.append(i + 1)
      if dev_hist[-1] < min(dev_hist[:-1]):
        best_u, best_step = u, i + 1
  if dev is None:
    best_u, best_step = u, steps
  packed, params = _states(tr.packed, tr.params, best_u)
  nnx.update(student, packed, params)
  return DistillResult(loss=np.asarray(history), dev_loss=np.asarray(dev_hist),
                       dev_steps=np.asarray(dev_at, np.int64), best_step=int(best_step),
                       trained=int(sum(v.size for v in tr.u.values())))
