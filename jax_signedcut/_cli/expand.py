"""``jax-signedcut expand``: a compressed file back to dense matrices (safetensors or orbax)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np

from jax_signedcut._cli import interrupts as _interrupts
from jax_signedcut._cli.args import CliError
from jax_signedcut._cli.compress import progress


def dtype_arg(s):
  import jax.numpy as jnp  # noqa: PLC0415

  table = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f32": jnp.float32,
           "float32": jnp.float32}
  if s not in table:
    raise argparse.ArgumentTypeError(f"dtype must be bf16 or f32, got {s!r}")
  return table[s]


def run(args) -> int:
  import jax  # noqa: PLC0415

  from jax_signedcut._checkpoint import expand as _expand  # noqa: PLC0415
  from jax_signedcut._checkpoint import orbax as _orbax  # noqa: PLC0415
  from jax_signedcut._checkpoint import reader as _reader  # noqa: PLC0415
  from jax_signedcut._checkpoint import sharded as _sharded  # noqa: PLC0415
  from jax_signedcut._checkpoint import structure as _structure  # noqa: PLC0415
  from jax_signedcut._checkpoint import writer as _writer  # noqa: PLC0415
  from jax_signedcut._core.protocol import is_compressed  # noqa: PLC0415
  from jax_signedcut._signedcut import factors as _factors  # noqa: PLC0415

  to_orbax = not args.output.endswith(".safetensors")
  if to_orbax and os.path.exists(args.output):
    raise CliError(f"{args.output}: exists; an orbax output directory must be new (or name a "
                   ".safetensors file)")
  trunc = {k: v for k, v in (("rate", args.truncate_rate), ("bits_per_weight", args.truncate_bits))
           if v is not None}
  with _sharded.open_reader(args.input) as r:
    bar = progress(len(r.entries), "expand", args.quiet)

    def leaves():
      for i, e in enumerate(r.entries):
        bar.set_postfix_str(e["path"])
        # At the stored width: trimmed slots would only add zeros.
        leaf = r.leaf(i, full_width=False)
        if is_compressed(leaf):
          if trunc and _reader.has_cuts(leaf):
            try:
              leaf = _factors.truncate(leaf, **trunc)
            except ValueError as ex:
              raise CliError(f"leaf {e['path']!r}: {ex}") from None
          leaf = np.asarray(jax.block_until_ready(_expand.expand_leaf(leaf, args.dtype)))
        yield e, leaf
        bar.update(1)

    try:
      if to_orbax:
        items = [(e["key"], leaf) for e, leaf in leaves()]
        tree = _structure.unflatten(items, args.input)
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
          raise CliError(f"{args.output}: the directory {parent} does not exist")
        with _writer.output_lock(args.output):
          tmp = None
          try:
            with _writer.deferred_interrupts():   # the name recorded before a Ctrl-C lands
              tmp = tempfile.mkdtemp(prefix=_writer.temp_prefix(args.output),
                                     suffix=".partial.tmp", dir=parent)
            _orbax.save_orbax(os.path.join(tmp, "ckpt"), tree)
            with _interrupts.commit(args.output):
              os.replace(os.path.join(tmp, "ckpt"), args.output)
          finally:
            if tmp is not None:
              shutil.rmtree(tmp, ignore_errors=True)
      else:
        with _writer.Writer(args.output) as w:
          for e, leaf in leaves():
            w.add(e["tensor"] if e["kind"] == "array" else e["path"], leaf)
          w.finish({"format": "np", "expanded_from": os.path.basename(args.input)},
                   commit=lambda: _interrupts.commit(args.output))
    finally:
      bar.close()
  if not args.quiet:
    print(f"wrote {args.output}")
  return 0
