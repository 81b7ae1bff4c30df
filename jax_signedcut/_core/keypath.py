"""The one key-path codec: ``jax.tree_util`` key paths as JSON components and as names.

A leaf's key path is written as a list of components, each ``["d", dict key]``,
``["i", sequence index]`` or ``["a", attribute name]``; its *path* is their
second entries joined with ``/`` (``params/Dense_0/kernel``, ``blocks/0/w``).
Rules match the path, per-leaf keys are derived from it, and checkpoints store
both, so they must agree: everything that names a leaf goes through here.

A trailing ``value`` attribute (what an ``nnx.Variable`` flattens to) is
dropped, so paths read as ``nnx.State`` prints them.
"""

from __future__ import annotations

import jax

#: Component kinds: dict key, sequence index, attribute.
KINDS = ("d", "i", "a")


def components(path) -> list:
  """JSON-able components of a ``jax.tree_util`` key path.

  Example:
    >>> components((jax.tree_util.DictKey("params"), jax.tree_util.SequenceKey(0)))
    [['d', 'params'], ['i', 0]]
  """
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      key = k.key
      out.append(["d", key if isinstance(key, (str, int)) and not isinstance(key, bool)
                  else str(key)])
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(["i", int(k.idx)])
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(["a", k.name])
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(["i", int(k.key)])
    else:
      out.append(["d", str(k)])
  if out and out[-1] == ["a", "value"]:
    out.pop()
  return out


def join(comps) -> str:
  """The ``/``-joined path of key components."""
  return "/".join(str(c[1]) for c in comps)


def leaf_path(path) -> str:
  """The ``/``-joined path of a ``jax.tree_util`` key path.

  Example:
    >>> leaf_path((jax.tree_util.DictKey("params"), jax.tree_util.SequenceKey(0)))
    'params/0'
  """
  return join(components(path))


def is_components(comps) -> bool:
  """Whether ``comps`` is a well-formed list of components (as read from JSON)."""
  return isinstance(comps, list) and all(
      isinstance(c, list) and len(c) == 2 and c[0] in KINDS
      and (isinstance(c[1], int) if c[0] == "i" else isinstance(c[1], (str, int)))
      and not isinstance(c[1], bool)
      for c in comps)
