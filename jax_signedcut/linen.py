"""Flax Linen layer holding a compressed kernel, and params conversion.

Each layer's compressed kernel (any :class:`~jax_signedcut.Compressed`: signed
cuts, a :class:`~jax_signedcut.Sum` of parts, RTN codes, LPLR factors …) is
one variable, ``kernel``, in its own collection ``"signed_cut"``
(:data:`COLLECTION`), held whole as the registered pytree it is — no field is
copied into a variable of its own. It is not in ``"params"``: ``jax.grad`` /
optax over ``variables["params"]`` then never meets integer leaves (whose
gradients would be ``float0``) and never moves the factors, and ``nn.scan`` /
``nn.vmap`` stack them with ``variable_axes={"params": 0, COLLECTION: 0}``.
The bias stays a normal ``"params"`` leaf. ``flax.serialization``
(``to_bytes`` / ``from_bytes`` with a target from ``init``) knows every
compressed type: each is stored as a dict of its array fields.

How the layer knows the kernel's structure: when applied to variables that
hold a kernel (from :func:`convert_params`), the kernel itself says it (its
type, parts and static shape travel with it), so ``SignedCutDense(features)``
applies any method's kernel. Only ``init`` has to create one: from ``width``
(zero signed cuts, with ``sparse_slots`` / ``lowrank`` for the parts that
``decompose`` adds), or from ``like``, a compressed value of the layer's
kernel or its ``jax.eval_shape`` (zeros of that structure, for any method).

Example:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import jax_signedcut as sc
  >>> from jax_signedcut.linen import SignedCutDense, convert_params
  >>> variables = nn.Sequential([nn.Dense(24)]).init(jax.random.key(0), jnp.ones((1, 40)))
  >>> f = sc.decompose(variables, key=jax.random.key(1), width=64)
  >>> new = convert_params(variables, f)
  >>> model = nn.Sequential([SignedCutDense(24, width=64)])
  >>> model.apply(new, jnp.ones((3, 40))).shape
  (3, 24)
  >>> q = sc.decompose(variables, key=jax.random.key(1), method="rtn", bits_per_weight=4)
  >>> type(convert_params(variables, q)["signed_cut"]["layers_0"]["kernel"]).__name__
  'QuantizedMatrix'
  >>> nn.Sequential([SignedCutDense(24)]).apply(
  ...     convert_params(variables, q), jnp.ones((3, 40))).shape
  (3, 24)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core import tree as _tree
from jax_signedcut._core.protocol import Compressed, check_compressed, is_compressed
from jax_signedcut._kernels.apply import apply_signed_cut, check_precision
from jax_signedcut._parts.lowrank import DTYPE as _LOWRANK_DTYPE
from jax_signedcut._parts.lowrank import LowRankPart
from jax_signedcut._parts.sparse import Sparse
from jax_signedcut._parts.sum import Sum
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut.factors import SignedCut

__all__ = ["COLLECTION", "KERNEL", "CompressedDense", "SignedCutDense", "convert_params"]

#: The variable collection holding the compressed kernels.
COLLECTION = "signed_cut"
#: The name of a layer's compressed kernel in that collection.
KERNEL = "kernel"


def _check_int(name, v, lo):
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
    raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


class SignedCutDense(nn.Module):
  """Linen twin of :class:`jax_signedcut.nnx.SignedCutDense`: ``y = x·W + b``, W compressed.

  For signed cuts ``y = ((x·S) ∘ c)·Tᵀ + b`` from the packed bits; other parts
  and methods use their own product.

  Attributes:
    features: output size n.
    width: for ``init``: cut slots w of zero signed cuts. Not needed to apply
      converted variables.
    use_bias: hold a ``"params"`` bias of shape (n,).
    dense: expand the kernel to a dense matrix on every call (large batches).
    in_features: optional input size m; any other raises.
    sparse_slots: with ``width``: slots of a sparse part (the capacity
      ``f.part(sc.Sparse).capacity`` of factors decomposed with ``outliers``;
      0: none).
    lowrank: with ``width``: rank r of a low-rank part (factors decomposed
      with ``lowrank=r``; 0: none).
    like: for ``init``, instead of ``width``: a compressed value of one
      (in, out) kernel or its ``jax.eval_shape`` (e.g.
      ``jax.eval_shape(lambda: f)``, hashable); ``init`` creates zeros of its
      structure. Any method.
    precision: how much the CPU kernel may round (``None``, ``"default"``,
      ``"bf16_bf16_f32"``, ``"highest"``, a ``jax.lax.Precision`` …), as for
      the NNX layer; a module attribute, not a variable.

  ``init`` creates a zero kernel in the ``"signed_cut"`` collection; fill it
  with :func:`convert_params`.

  Raises:
    ValueError: (on construction) ``features`` or ``width`` < 1, both
      ``width`` and ``like``, a ``like`` of another output size, or an
      unknown ``precision``.
  """

  features: int
  width: int | None = None
  use_bias: bool = True
  dense: bool = False
  in_features: int | None = None
  sparse_slots: int = 0
  lowrank: int = 0
  like: Any = None
  precision: Any = None  # last: the fields before it keep their positions

  def __post_init__(self):
    _check_int("features", self.features, 1)
    if self.width is not None:
      _check_int("width", self.width, 1)
    if self.in_features is not None:
      _check_int("in_features", self.in_features, 1)
    _check_int("sparse_slots", self.sparse_slots, 0)
    _check_int("lowrank", self.lowrank, 0)
    check_precision(self.precision)
    if self.like is not None:
      check_compressed(self.like, "like")
      if self.width is not None or self.sparse_slots or self.lowrank:
        raise ValueError("give like= or width= (with sparse_slots/lowrank), not both")
      if self.like.batch_shape or len(self.like.shape) != 2 \
          or self.like.shape[1] != self.features:
        raise ValueError(f"like must compress one (in, {self.features}) kernel, got shape "
                         f"{tuple(self.like.batch_shape) + tuple(self.like.shape)}")
    elif self.width is None and (self.sparse_slots or self.lowrank):
      raise ValueError("sparse_slots and lowrank describe signed cuts: give width= too")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m, n = x.shape[-1], self.features
    if self.in_features is not None and m != self.in_features:
      raise ValueError(f"x must have shape (..., {self.in_features}) for {self.name!r} "
                       f"(in_features={self.in_features}), got x shape {tuple(x.shape)}")
    f = self.variable(COLLECTION, KERNEL, self._zero_kernel, m).value
    check_compressed(f, f"{COLLECTION}/{self.name}/{KERNEL}")
    if tuple(f.shape) != (m, n):
      raise ValueError(f"x has last dim {m} and features={n}, but the kernel of {self.name!r} "
                       f"compresses (in, out) = {tuple(f.shape)}")
    bias = self.param("bias", nn.initializers.zeros_init(), (n,), jnp.float32) \
        if self.use_bias else None
    return apply_signed_cut(x, f, bias, dense=self.dense, precision=self.precision)

  def _zero_kernel(self, m: int):
    """The kernel ``init`` creates: zeros of ``like``'s structure, or zero signed cuts."""
    n = self.features
    if self.like is not None:
      if self.like.shape[0] != m:
        raise ValueError(f"x has last dim {m} but like compresses (in, out) = "
                         f"{tuple(self.like.shape)}")
      _register_flax_state(type(self.like))
      return jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), a.dtype), self.like)
    if self.width is None:
      raise ValueError(
          f"{self.name!r} has no kernel to apply: init needs width= (signed cuts) or like= "
          "(a compressed kernel or its jax.eval_shape) to create one")
    w = self.width
    cuts = SignedCut(jnp.zeros((w, _packing.num_words(m)), jnp.uint32),
                     jnp.zeros((w, _packing.num_words(n)), jnp.uint32),
                     jnp.zeros((w,), jnp.float32), jnp.int32(0), shape=(m, n))
    # The parts in decompose's order: low rank, cuts, sparse.
    parts = [cuts]
    if self.lowrank:
      r = self.lowrank
      parts.insert(0, LowRankPart(jnp.zeros((m, r), _LOWRANK_DTYPE),
                                  jnp.zeros((n, r), _LOWRANK_DTYPE), shape=(m, n)))
    if self.sparse_slots:
      k = self.sparse_slots
      parts.append(Sparse(jnp.zeros((k,), jnp.int32), jnp.zeros((k,), jnp.float32),
                          jnp.int32(0), shape=(m, n)))
    return cuts if len(parts) == 1 else Sum(tuple(parts))


#: The same layer under the name that says it holds any compressed kernel.
CompressedDense = SignedCutDense


def convert_params(variables, factors=None, *, module: nn.Module | None = None, inputs=None,
                   **decompose_kwargs):
  """Variables of a model using ``nn.Dense`` → variables for the same model with
  ``SignedCutDense`` (same submodule names) in place of the compressed layers.

  Every compressed leaf (any method) at ``params/…/NAME/kernel`` moves whole
  to ``signed_cut/…/NAME/kernel``; the bias and every other leaf stay where
  they are. Stacked kernels (``nn.scan``) give stacked kernels. A sparse part
  that holds no entries (``outliers="auto"`` found none) is dropped, so that
  a layer declared without ``sparse_slots`` takes the result.

  Args:
    variables: the original variables (``{"params": …, …}``).
    factors: ``decompose(variables, ...)`` (or of ``variables["params"]``
      nested back under ``"params"``), or any pytree of that structure with
      compressed leaves. ``None``: decompose here with ``decompose_kwargs``
      (``key``, ``rules``, ``rate`` …).
    module: optional target module definition; with ``inputs``, the result is
      checked leaf by leaf against ``jax.eval_shape(module.init, …)``.
    inputs: sample inputs for that check.
    **decompose_kwargs: only with ``factors=None``.

  Returns:
    The new variables dict.

  Raises:
    ValueError: a compressed value not at a ``params/…/kernel`` path, or (with
      ``module``) a missing, extra or mis-shaped leaf or a kernel of another
      type, quoting both.
  """
  from jax_signedcut._signedcut.decompose import decompose  # noqa: PLC0415
  if factors is None:
    if not decompose_kwargs:
      raise ValueError("convert_params needs factors or decompose arguments (key=..., rules=...)")
    factors = decompose(variables, **decompose_kwargs)
  elif decompose_kwargs:
    raise ValueError(f"decompose arguments {sorted(decompose_kwargs)} are only used when "
                     "factors is None")
  if "params" not in factors and "params" in variables:
    factors = {**variables, "params": factors}
  flat, _ = jax.tree_util.tree_flatten_with_path(factors, is_leaf=is_compressed)
  out: dict = {}
  for kp, leaf in flat:
    parts = _tree.leaf_path(kp).split("/")
    if is_compressed(leaf):
      if parts[-1] != "kernel" or parts[0] != "params":
        raise ValueError(f"a compressed {type(leaf).__name__} at {'/'.join(parts)!r}: only "
                         "params/…/kernel leaves (nn.Dense kernels) can be converted")
      _register_flax_state(type(leaf))
      _put(out, [COLLECTION, *parts[1:-1], KERNEL], _drop_empty_sparse(leaf))
    else:
      _put(out, parts, leaf)
  if module is not None:
    _check_against(module, inputs, out)
  return out


def _drop_empty_sparse(f):
  """``f`` without a sparse part that stores no entry (a Sum of the rest, or its one part)."""
  if not isinstance(f, Sum):
    return f

  def empty(p):
    return isinstance(p, Sparse) and not isinstance(p.count, jax.core.Tracer) \
        and not np.any(np.asarray(p.count) > 0)

  parts = tuple(p for p in f.parts if not empty(p))
  if not parts or len(parts) == len(f.parts):
    return f
  return parts[0] if len(parts) == 1 else Sum(parts)


def _put(d, parts, value):
  for p in parts[:-1]:
    d = d.setdefault(p, {})
  d[parts[-1]] = value


def _describe(f) -> str:
  kind = type(f).__name__
  if isinstance(f, Sum):
    kind += "(" + ", ".join(type(p).__name__ for p in f.parts) + ")"
  return f"{kind} of shape {tuple(f.batch_shape) + tuple(f.shape)}"


def _static_diff(g, w) -> str:
  """The static fields (bits, grid …) in which two compressed values of one type differ."""
  diff = [f"{fl.name} {getattr(g, fl.name)!r} vs {getattr(w, fl.name)!r}"
          for fl in dataclasses.fields(g)
          if fl.metadata.get("static", False) and getattr(g, fl.name) != getattr(w, fl.name)]
  return ", ".join(diff) if diff else \
      f"structures differ: {jax.tree.structure(g)} vs {jax.tree.structure(w)}"


def _check_against(module, inputs, variables):
  if inputs is None:
    raise ValueError("convert_params(module=...) needs inputs=... to trace the module's shapes")
  want = jax.eval_shape(module.init, jax.random.key(0), inputs)

  def by_path(tree, **kw):
    return {_tree.leaf_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree, **kw)[0]}

  problems = []
  # The kernels as wholes: type, parts and static fields (shape, bits …).
  got_k, want_k = by_path(variables, is_leaf=is_compressed), by_path(want, is_leaf=is_compressed)
  for p in sorted(set(got_k) & set(want_k)):
    g, w = got_k[p], want_k[p]
    if is_compressed(g) and is_compressed(w) and \
        jax.tree.structure(g) != jax.tree.structure(w):
      problems.append(f"{p}: converted {_describe(g)}, the module expects {_describe(w)}"
                      + ("" if _describe(g) != _describe(w) else f" ({_static_diff(g, w)})"))
  # Then every array leaf, by its key path through the kernel.
  got_flat, want_flat = by_path(variables), by_path(want)
  for p in sorted(set(want_flat) | set(got_flat)):
    if p not in got_flat:
      problems.append(f"{p}: missing (the module expects shape {want_flat[p].shape})")
    elif p not in want_flat:
      problems.append(f"{p}: not in the module (shape {jnp.shape(got_flat[p])})")
    elif tuple(jnp.shape(got_flat[p])) != tuple(want_flat[p].shape):
      problems.append(f"{p}: converted shape {tuple(jnp.shape(got_flat[p]))}, the module "
                      f"expects {tuple(want_flat[p].shape)}")
    elif jnp.result_type(got_flat[p]) != want_flat[p].dtype:
      problems.append(f"{p}: converted dtype {jnp.result_type(got_flat[p])}, the module "
                      f"expects {want_flat[p].dtype}")
  if problems:
    raise ValueError("converted variables do not match the module:\n  " + "\n  ".join(problems))


# flax.serialization walks variables by type; a compressed value is a frozen
# dataclass whose non-static fields are its arrays (or its parts), so one pair
# of functions serves every type, registered for those defined at import and
# for any other when convert_params or init first meets it.
def _array_fields(f):
  return [fl.name for fl in dataclasses.fields(f) if not fl.metadata.get("static", False)]


def _to_state(f):
  return {name: flax.serialization.to_state_dict(getattr(f, name)) for name in _array_fields(f)}


def _from_state(target, state):
  names = _array_fields(target)
  if set(state) != set(names):
    raise ValueError(f"a {type(target).__name__} needs the fields {sorted(names)}, the state has "
                     f"{sorted(state)} at {flax.serialization.current_path()}")
  return dataclasses.replace(target, **{
      name: flax.serialization.from_state_dict(getattr(target, name), state[name], name=name)
      for name in names})


def _register_flax_state(cls) -> None:
  if not dataclasses.is_dataclass(cls):
    return
  try:
    flax.serialization.register_serialization_state(cls, _to_state, _from_state)
  except ValueError:
    pass  # registered already (here, or by the type's author: theirs is kept)


def _subclasses(cls):
  for sub in cls.__subclasses__():
    yield sub
    yield from _subclasses(sub)


for _cls in _subclasses(Compressed):
  _register_flax_state(_cls)
