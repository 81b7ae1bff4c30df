"""Batched per-matrix computations that stay on each device's shard.

Every batched step of a decomposition treats the matrices of a stack
independently. Under ``jax.jit`` with a stack sharded on its leading (batch)
axis, XLA partitions most operations along that axis by itself, but not custom
calls: the C++ kernel, and on CPU ``top_k`` and the LAPACK factorizations, would
each be preceded by an all-gather of the whole stack. :func:`per_matrix` marks
such a step with ``custom_partitioning``: the SPMD partitioner runs it on each
device's own rows (its other axes replicated first if they are sharded), and the
results come back sharded the same way. Inside ``jax.shard_map`` the step runs
on the shard as it is; under ``jax.vmap`` it is simply vmapped.
"""

from __future__ import annotations

import functools

import jax


def _rule(in_ranks, out_ranks):
  """A Shardy rule: factor ``b`` shared by every operand's and result's leading axis, all
  other axes their own factors that must stay replicated."""
  names = []

  def dims(rank):
    d = [f"x{len(names) + i}" for i in range(rank - 1)]
    names.extend(d)
    return " ".join(["b", *d])

  ins = ", ".join(dims(r) for r in in_ranks)
  outs = ", ".join(dims(r) for r in out_ranks)
  return f"{ins} -> {outs}", tuple(names)


@functools.cache
def _wrapped(fn, in_ranks):
  from jax.experimental.custom_partitioning import custom_partitioning  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  @custom_partitioning
  def split(*args):
    return tuple(fn(*args))

  def shardings(mesh, arg_shapes, result_shape):
    spec = getattr(arg_shapes[0].sharding, "spec", ())
    batch = spec[0] if len(spec) else None
    like = lambda x: NamedSharding(mesh, P(batch, *(None,) * (len(x.shape) - 1)))  # noqa: E731
    return tuple(like(x) for x in result_shape), tuple(like(x) for x in arg_shapes)

  def partition(mesh, arg_shapes, result_shape):
    res, args = shardings(mesh, arg_shapes, result_shape)
    return mesh, lambda *a: tuple(fn(*a)), res, args

  def infer(mesh, arg_shapes, result_shape):   # the GSPMD partitioner's question
    return shardings(mesh, arg_shapes, result_shape)[0]

  def rule(mesh, value_types, result_types):
    del mesh, value_types
    rule, names = _rule(in_ranks, [len(t.shape) for t in result_types])
    return rule, {"need_replication_factors": names}

  split.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)

  @jax.custom_batching.custom_vmap
  def call(*args):
    return split(*args)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *args):
    del axis_size
    out = jax.vmap(lambda *a: tuple(fn(*a)), in_axes=tuple(0 if b else None for b in in_batched))(
        *args)
    return out, (True,) * len(out)

  return call


def per_matrix(fn, *args):
  """``fn(*args)`` (a tuple of arrays), split over devices along the leading (batch) axis.

  ``fn`` must treat row ``i`` of every argument and result as one independent
  problem: all arguments and results have the same leading dimension. It should
  be a stable object (a module-level function or a cached ``functools.partial``)
  so that the wrapper is built once.
  """
  if len({a.shape[0] for a in args}) != 1:
    raise ValueError(f"per_matrix: the arguments' leading dims differ: "
                     f"{[tuple(a.shape) for a in args]}")
  return _wrapped(fn, tuple(a.ndim for a in args))(*args)
