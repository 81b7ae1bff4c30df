"""Sharded stacks: ``decompose`` of a (layers, m, n) stack sharded over 4 host devices.

The host device count is fixed when jax starts, so the checks run in a child
process started with ``--xla_force_host_platform_device_count=4``; it prints one
line per check and the test asserts on them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jax_signedcut as sc

    assert len(jax.devices()) == 4, jax.devices()
    x = jax.random.normal(jax.random.key(0), (4, 256, 192))
    x = x.at[1, 3, 5].set(60.0)          # one planted outlier: a Sparse part too
    key = jax.random.key(1)

    def run(a):
      # outliers (default "auto") and a low-rank part, so every batched step is on the
      # shard; backend "auto" traces the jnp oracle's branch too (checked under shard_map)
      return sc.decompose(a, key=key, width=12, lowrank=2)

    def same(f, g):
      fl, fd = jax.tree.flatten(f)
      gl, gd = jax.tree.flatten(g)
      return fd == gd and all(np.array_equal(np.asarray(u), np.asarray(v))
                              for u, v in zip(fl, gl))

    def leading(f):
      # every factor array sharded on its leading (batch) axis over "d", one matrix a device
      return all(isinstance(l.sharding, NamedSharding) and l.sharding.spec[:1] == ("d",)
                 and len(l.addressable_shards) == 4 and l.addressable_shards[0].data.shape[0] == 1
                 for l in jax.tree.leaves(f))

    want = jax.jit(run)(x)
    for kind in (AxisType.Auto, AxisType.Explicit):
      mesh = jax.make_mesh((4,), ("d",), axis_types=(kind,))
      xs = jax.device_put(x, NamedSharding(mesh, P("d")))
      jitted = jax.jit(run)
      hlo = jitted.lower(xs).compile().as_text()
      got = jitted(xs)
      print("jit", kind.name, same(got, want), "all-gather" not in hlo, leading(got))
    inside = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    print("shard_map", kind.name, same(inside(xs), want))
    # eagerly, one key per matrix (sharded like the stack), on the explicit mesh
    keys = jax.random.split(key, 4)
    eager = sc.decompose(xs, key=keys, width=12, lowrank=2)
    print("eager", kind.name, same(eager, sc.decompose(x, key=keys, width=12, lowrank=2)),
          leading(eager))
    print("done")
""")


def test_sharded_stack_on_four_host_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                       timeout=240, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.split("\n")
  assert lines[-2:] == ["done", ""], out.stdout
  checks = lines[:-2]
  assert len(checks) == 4, checks          # jit (2 axis types), shard_map, eager
  for line in checks:
    flags = line.split()[2:]
    assert flags and flags == ["True"] * len(flags), line
