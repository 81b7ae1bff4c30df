"""Orbax checkpoints: compressed pytrees saved and restored, dense ones read leaf by leaf.

A compressed leaf is stored as the sub-tree ``{"__jax_signedcut__": {"node":
uint8 JSON bytes, "t0": array, "t1": …}}``: the codec's node (what
:mod:`jax_signedcut._checkpoint.codec` writes into a safetensors header, with
tensor names replaced by ``t<i>``) and its arrays, untrimmed. Sub-trees
``{"__signed_cut__": {fields…, "shape"}}`` written by earlier releases are
read as the current types (:func:`jax_signedcut._checkpoint.legacy.orbax_value`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._checkpoint import codec as _codec
from jax_signedcut._checkpoint import format as _format
from jax_signedcut._checkpoint import legacy as _legacy
from jax_signedcut._checkpoint import types as _types  # noqa: F401  (registers the codecs)
from jax_signedcut._core import keypath as _keypath
from jax_signedcut._core.protocol import is_compressed

MARK = "__jax_signedcut__"
LEGACY_MARK = "__signed_cut__"
_MARKS = (MARK, LEGACY_MARK)


def _encode(x):
  node, tensors = _codec.encode(x, "", trim=False)
  names = {}
  out = {}
  for i, (name, a) in enumerate(tensors):
    names[name] = f"t{i}"
    out[f"t{i}"] = a
  for spec in _codec.tensor_specs(node):
    spec["tensor"] = names[spec["tensor"]]
  out["node"] = np.frombuffer(json.dumps(node, separators=(",", ":")).encode("utf-8"), np.uint8)
  return {MARK: out}


def _to_orbax_tree(tree):
  return jax.tree.map(lambda x: _encode(x) if is_compressed(x) else x, tree,
                      is_leaf=is_compressed)


def _decode(d, where):
  try:
    node = json.loads(np.asarray(d["node"], np.uint8).tobytes().decode("utf-8"))

    def read(spec):
      a = np.asarray(d[spec["tensor"]])
      want = (_format.DTYPES[spec["dtype"]], tuple(spec["shape"]))
      if (a.dtype, a.shape) != want:
        raise ValueError(f"array {spec['tensor']} is {a.dtype}{a.shape}, the node says "
                         f"{want[0]}{want[1]}")
      return a

    x = _codec.decode(node, read)
  except (KeyError, TypeError, ValueError) as e:
    raise _format.CheckpointError(f"{where}: a compressed entry is malformed "
                                  f"({_format.one_line(e)[:300]})") from None
  return jax.tree.map(jnp.asarray, x)


def _decode_legacy(d, where):
  try:
    x = _legacy.orbax_value(d)
  except (KeyError, TypeError, ValueError) as e:
    raise _format.CheckpointError(f"{where}: a signed cut entry is malformed "
                                  f"({_format.one_line(e)[:300]})") from None
  return jax.tree.map(jnp.asarray, x)


def _is_marked(x) -> bool:
  return isinstance(x, dict) and len(x) == 1 and next(iter(x)) in _MARKS


def _from_orbax_tree(tree, where):
  if _is_marked(tree):
    (mark, d), = tree.items()
    return _decode(d, where) if mark == MARK else _decode_legacy(d, where)
  if isinstance(tree, dict):
    return {k: _from_orbax_tree(v, where) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_from_orbax_tree(v, where) for v in tree)
  return tree


def save_orbax(directory, tree) -> None:
  """Saves a pytree (compressed leaves of any type allowed) as an orbax checkpoint.

  Compressed leaves are stored as ``{"__jax_signedcut__": {...}}`` sub-trees
  of arrays (see the module doc); a Flax ``nnx.state(model)`` or a Linen
  variables dict is saved as it is.

  Args:
    directory: the checkpoint directory; it must not exist yet.
    tree: the pytree.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(os.fspath(directory))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, _to_orbax_tree(tree))
    ckptr.wait_until_finished()


def load_orbax(directory, *, like=None):
  """Loads an orbax checkpoint written by :func:`save_orbax` (or by Flax/orbax).

  Args:
    directory: the checkpoint directory.
    like: optional: a tree of the saved structure (e.g. ``nnx.state(model)``
      or ``jax.eval_shape`` of it) to restore into. Without it the saved
      structure comes back as nested dicts/lists.

  Returns:
    The tree, with compressed leaves rebuilt.

  Raises:
    FileNotFoundError: no such directory.
    ValueError: the directory is not a readable orbax checkpoint, or a
      compressed entry in it is malformed.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such checkpoint directory")
  target = None if like is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x,
      _to_orbax_tree(like))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(directory, target) if target is not None else ckptr.restore(directory)
  except Exception as e:  # noqa: BLE001  (orbax raises many types, FileNotFoundError included)
    raise _format.CheckpointError(f"{directory}: cannot restore the orbax checkpoint: "
                                  f"{_format.one_line(e)[:300]}") from None
  if like is not None:
    return jax.tree.map(lambda x: _from_orbax_tree(x, directory) if _is_marked(x) else x,
                        tree, is_leaf=_is_marked)
  return _from_orbax_tree(tree, directory)


def orbax_leaf_specs(directory):
  """The leaves of a dense orbax checkpoint, read from its metadata (no array is loaded).

  Returns:
    ``(specs, tree)``: ``specs`` is ``[(key components, shape, numpy dtype)]`` in
    ``flatten`` order, ``tree`` the metadata tree that :func:`restore_orbax_leaf`
    takes.

  Raises:
    CheckpointError: an unreadable checkpoint, or one that already holds
      signed cuts (``save_orbax`` of a compressed tree).
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(os.fspath(directory))
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.metadata(directory).item_metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    specs = [(_keypath.components(kp), tuple(int(d) for d in x.shape), np.dtype(x.dtype))
             for kp, x in flat]
  except Exception as e:  # noqa: BLE001  (orbax raises many types)
    raise _format.CheckpointError(f"{directory}: cannot read the orbax checkpoint's metadata: "
                                  f"{_format.one_line(e)[:300]}") from None
  for comps, _, _ in specs:
    if any(c[1] in _MARKS for c in comps):
      raise _format.CheckpointError(f"{directory}: is already a jax_signedcut (compressed) "
                                    "checkpoint; use 'expand', or load_orbax it")
  return specs, tree


def restore_orbax_leaf(directory, tree, index: int) -> np.ndarray:
  """Restores only leaf ``index`` (in ``orbax_leaf_specs`` order) of an orbax checkpoint.

  An orbax partial restore: the other leaves are not read, so a checkpoint can
  be processed one matrix at a time in the memory of one.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(os.fspath(directory))
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  item = jax.tree_util.tree_unflatten(treedef, [
      jax.ShapeDtypeStruct(x.shape, x.dtype) if i == index else None
      for i, x in enumerate(leaves)])
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise _format.CheckpointError(f"{directory}: cannot restore leaf {index} of the orbax "
                                  f"checkpoint: {_format.one_line(e)[:300]}") from None
  got = [x for x in jax.tree_util.tree_leaves(out) if x is not None]
  if len(got) != 1 or tuple(got[0].shape) != tuple(leaves[index].shape):
    raise _format.CheckpointError(f"{directory}: leaf {index} came back as "
                                  f"{[tuple(np.shape(x)) for x in got]}, expected "
                                  f"{tuple(leaves[index].shape)}")
  return np.asarray(got[0])


def is_orbax_dir(path) -> bool:
  """Whether ``path`` looks like an orbax checkpoint directory."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return False
  names = set(os.listdir(path))
  return bool(names & {"_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "_sharding",
                       "checkpoint"}) or any(n.startswith("ocdbt.process") for n in names)

