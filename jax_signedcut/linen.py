"""Flax Linen layer holding a signed cut decomposition, and params conversion.

The packed factors live in their own variable collection, ``"signed_cut"``
(:data:`COLLECTION`), not in ``"params"``: ``jax.grad`` / optax over
``variables["params"]`` then never meets uint32 leaves (whose gradients would
be ``float0``) and never moves the factors, and ``nn.scan`` / ``nn.vmap``
handle them with ``variable_axes={"params": 0, COLLECTION: 0}``. The bias stays
a normal ``"params"`` leaf.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import jax_signedcut as sc
  >>> from jax_signedcut.linen import SignedCutDense, convert_params
  >>> dense = nn.Dense(24, name="proj")
  >>> variables = nn.Sequential([dense]).init(jax.random.key(0), jnp.ones((1, 40)))
  >>> f = sc.decompose(variables, key=jax.random.key(1), width=64)
  >>> new = convert_params(variables, f)
  >>> model = nn.Sequential([SignedCutDense(24, width=64, name="proj")])
  >>> model.apply(new, jnp.ones((3, 40))).shape
  (3, 24)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._core import tree as _tree
from jax_signedcut._kernels.apply import apply_signed_cut
from jax_signedcut._signedcut.factors import SignedCut

__all__ = ["COLLECTION", "SignedCutDense", "convert_params"]

#: The variable collection holding s_bits, t_bits, c and num_cuts.
COLLECTION = "signed_cut"

_FIELDS = ("s_bits", "t_bits", "c", "num_cuts")
_SPARSE_FIELDS = ("sparse_idx", "sparse_val", "num_sparse")
_LOWRANK_FIELDS = ("lr_u", "lr_v")


class SignedCutDense(nn.Module):
  """Linen twin of :class:`jax_signedcut.nnx.SignedCutDense`: ``y = ((x·S) ∘ c)·Tᵀ + b``.

  Attributes:
    features: output size n.
    width: number of cut slots w.
    use_bias: hold a ``"params"`` bias of shape (n,).
    dense: expand to a dense kernel once per call (large batches).
    in_features: optional input size m. Linen variables only record
      ceil(m/32) sign words, so without it an input of a different size with
      the same word count cannot be told apart; with it any other size raises.
    sparse_slots: slots of the sparse part (``f.sparse_idx.shape[-1]`` of
      factors decomposed with ``outliers``; 0: none). Factors with a sparse
      part need it: ``convert_params(module=..., inputs=...)`` reports a
      mismatch as missing or extra ``sparse_*`` leaves.
    lowrank: rank r of the low-rank part (``f.rank`` of factors decomposed
      with ``lowrank=r``; 0: none): bf16 ``lr_u`` (m, r) and ``lr_v`` (n, r).

  ``init`` creates zero factors in the ``"signed_cut"`` collection; fill them
  with :func:`convert_params`.
  """

  features: int
  width: int
  use_bias: bool = True
  dense: bool = False
  in_features: int | None = None
  sparse_slots: int = 0
  lowrank: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m, n, w = x.shape[-1], self.features, self.width
    if self.in_features is not None and m != self.in_features:
      raise ValueError(f"x must have shape (..., {self.in_features}) for {self.name!r} "
                       f"(in_features={self.in_features}), got x shape {tuple(x.shape)}")
    zeros = lambda shape, dtype: lambda: jnp.zeros(shape, dtype)  # noqa: E731
    s_bits = self.variable(COLLECTION, "s_bits", zeros((w, _packing.num_words(m)), jnp.uint32))
    t_bits = self.variable(COLLECTION, "t_bits", zeros((w, _packing.num_words(n)), jnp.uint32))
    c = self.variable(COLLECTION, "c", zeros((w,), jnp.float32))
    num_cuts = self.variable(COLLECTION, "num_cuts", zeros((), jnp.int32))
    # Linen does not keep the input size, only ceil(m/32) words; convert_params(module=...,
    # inputs=...) checks the exact shapes once.
    if s_bits.value.shape != (w, _packing.num_words(m)):
      raise ValueError(
          f"x has last dim {m} but the factors of {self.name!r} hold s_bits of shape "
          f"{s_bits.value.shape} (width {w}, inputs of {32 * s_bits.value.shape[-1] - 31}.."
          f"{32 * s_bits.value.shape[-1]} features)")
    if t_bits.value.shape != (w, _packing.num_words(n)) or c.value.shape != (w,):
      raise ValueError(
          f"the factors of {self.name!r} (t_bits {t_bits.value.shape}, c {c.value.shape}) do "
          f"not match features={n}, width={w}")
    sparse = {}
    if self.sparse_slots:
      k = self.sparse_slots
      sparse = dict(
          sparse_idx=self.variable(COLLECTION, "sparse_idx", zeros((k,), jnp.int32)).value,
          sparse_val=self.variable(COLLECTION, "sparse_val", zeros((k,), jnp.float32)).value,
          num_sparse=self.variable(COLLECTION, "num_sparse", zeros((), jnp.int32)).value)
    if self.lowrank:
      r = self.lowrank
      sparse.update(
          lr_u=self.variable(COLLECTION, "lr_u", zeros((m, r), jnp.bfloat16)).value,
          lr_v=self.variable(COLLECTION, "lr_v", zeros((n, r), jnp.bfloat16)).value)
    f = SignedCut(s_bits.value, t_bits.value, c.value, num_cuts.value, shape=(m, n), **sparse)
    bias = self.param("bias", nn.initializers.zeros_init(), (n,), jnp.float32) \
        if self.use_bias else None
    return apply_signed_cut(x, f, bias, dense=self.dense)


def convert_params(variables, factors=None, *, module: nn.Module | None = None, inputs=None,
                   **decompose_kwargs):
  """Variables of a model using ``nn.Dense`` → variables for the same model with
  ``SignedCutDense`` (same submodule names) in place of the decomposed layers.

  Every ``SignedCut`` leaf at ``params/…/NAME/kernel`` becomes
  ``signed_cut/…/NAME/{s_bits,t_bits,c,num_cuts}`` (plus
  ``sparse_idx,sparse_val,num_sparse`` when it stores entries apart: declare
  ``sparse_slots`` on that layer; an empty sparse part is dropped; plus ``lr_u,lr_v`` with a
  low-rank part: declare ``lowrank``); the bias and every other
  leaf stay where they are. Stacked kernels (``nn.scan``) give stacked factors.

  Args:
    variables: the original variables (``{"params": …, …}``).
    factors: ``decompose(variables, ...)`` (or of ``variables["params"]``
      nested back under ``"params"``). ``None``: decompose here with
      ``decompose_kwargs`` (``key``, ``rules``, ``rate`` …).
    module: optional target module definition; with ``inputs``, the result is
      checked leaf by leaf against ``jax.eval_shape(module.init, …)``.
    inputs: sample inputs for that check.
    **decompose_kwargs: only with ``factors=None``.

  Returns:
    The new variables dict.

  Raises:
    ValueError: a ``SignedCut`` not at a ``…/kernel`` path, or (with
      ``module``) a missing, extra or mis-shaped leaf, quoting both shapes.
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
  flat, _ = jax.tree_util.tree_flatten_with_path(factors, is_leaf=lambda x: isinstance(x, SignedCut))
  out: dict = {}
  for kp, leaf in flat:
    parts = _tree.leaf_path(kp).split("/")
    if isinstance(leaf, SignedCut):
      if parts[-1] != "kernel" or parts[0] != "params":
        raise ValueError(f"a SignedCut at {'/'.join(parts)!r}: only params/…/kernel leaves "
                         "(nn.Dense kernels) can be converted")
      names = _FIELDS + (_SPARSE_FIELDS if _has_sparse(leaf) else ()) + \
          (_LOWRANK_FIELDS if leaf.lr_u is not None else ())
      for name in names:
        _put(out, [COLLECTION, *parts[1:-1], name], getattr(leaf, name))
    else:
      _put(out, parts, leaf)
  if module is not None:
    _check_against(module, inputs, out)
  return out


def _has_sparse(f: SignedCut) -> bool:
  """Whether ``f`` stores entries apart (an empty sparse part is dropped)."""
  if f.sparse_idx is None:
    return False
  if isinstance(f.num_sparse, jax.core.Tracer):
    return True
  return bool(np.any(np.asarray(f.num_sparse) > 0))


def _put(d, parts, value):
  for p in parts[:-1]:
    d = d.setdefault(p, {})
  d[parts[-1]] = value


def _check_against(module, inputs, variables):
  if inputs is None:
    raise ValueError("convert_params(module=...) needs inputs=... to trace the module's shapes")
  want = jax.eval_shape(module.init, jax.random.key(0), inputs)
  got_flat = {_tree.leaf_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  want_flat = {_tree.leaf_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  problems = []
  for p in sorted(set(want_flat) | set(got_flat)):
    if p not in got_flat:
      problems.append(f"{p}: missing (the module expects shape {want_flat[p].shape})")
    elif p not in want_flat:
      problems.append(f"{p}: not in the module (shape {jnp.shape(got_flat[p])})")
    elif tuple(jnp.shape(got_flat[p])) != tuple(want_flat[p].shape):
      problems.append(f"{p}: converted shape {tuple(jnp.shape(got_flat[p]))}, the module "
                      f"expects {tuple(want_flat[p].shape)}")
  if problems:
    raise ValueError("converted variables do not match the module:\n  " + "\n  ".join(problems))
