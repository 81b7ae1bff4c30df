"""The tree structure of a checkpoint: leaves by key path, and nested dicts/lists back.

The file stores every leaf's key components (:mod:`jax_signedcut._core.keypath`);
:func:`unflatten` rebuilds nested ``dict`` s (dict keys and attribute names)
and ``list`` s (sequence indices) from them. Tuples come back as lists, custom
pytree nodes (``nnx.State``, NamedTuples) as dicts keyed by their field names.
"""

from __future__ import annotations

from typing import Any

import jax

from jax_signedcut._checkpoint.format import CheckpointError
from jax_signedcut._core import keypath as _keypath
from jax_signedcut._core.protocol import is_compressed


def flatten(tree) -> list[tuple[list, Any]]:
  """``[(key components, leaf)]``, compressed values as leaves (``None`` leaves dropped)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
  return [(_keypath.components(kp), leaf) for kp, leaf in flat]


def unflatten(items, where: str = "tree"):
  """Nested dicts/lists from ``[(key components, leaf)]`` (see the module doc).

  Raises:
    CheckpointError: two leaves at one path, a path that is both a leaf and a
      container, or one that mixes sequence and mapping keys at one depth
      (naming ``where``).
  """
  if not items:
    return {}   # a tree without leaves (``{}``, ``[]``, ``None``) comes back as ``{}``
  if len(items) == 1 and not items[0][0]:
    return items[0][1]
  root: Any = None
  # A list grows to its largest index (None leaves are not stored): bound it by
  # the leaves there are, so that a header cannot make a huge list.
  most = 4 * len(items) + 64

  def container(kind):
    return [] if kind == "i" else {}

  for comps, leaf in items:
    path = _keypath.join(comps)
    if not comps:
      raise CheckpointError(f"{where}: a leaf with an empty key path among other leaves")
    if root is None:
      root = container(comps[0][0])
    node = root
    for depth, (kind, key) in enumerate(comps):
      last = depth == len(comps) - 1
      if isinstance(node, list) != (kind == "i"):
        raise CheckpointError(f"{where}: key path {path!r} mixes sequence and mapping "
                              f"keys at depth {depth}")
      if kind == "i":
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < most:
          raise CheckpointError(f"{where}: bad sequence index {key!r} in {path!r} (an index "
                                f"< {most} for a tree of {len(items)} leaves)")
        while len(node) <= key:
          node.append(None)
        slot_exists = node[key] is not None
      else:
        slot_exists = key in node
      if last:
        if slot_exists:
          raise CheckpointError(f"{where}: two leaves at {path!r}")
        node[key] = leaf
      else:
        if not slot_exists:
          node[key] = container(comps[depth + 1][0])
        node = node[key]
        if not isinstance(node, (dict, list)):
          raise CheckpointError(f"{where}: {_keypath.join(comps[:depth + 1])!r} is both a leaf "
                                "and a container")
  return root
