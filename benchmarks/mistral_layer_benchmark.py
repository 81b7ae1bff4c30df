"""One Mistral-7B decoder layer compressed at rate ½: one process against 2 processes.

The layer's seven matrices at Mistral-7B's shapes (stored out × in, as in the
Hugging Face checkpoint): q_proj and o_proj 4096×4096, k_proj and v_proj
1024×4096, gate_proj and up_proj 14336×4096, down_proj 4096×14336, plus the two
RMSNorm scales. The weights are synthetic with the real matrices' scale and heavy
tails: Student-t entries (4 degrees of freedom) scaled to a standard deviation of
0.02, and 1 in 10⁵ entries made 40× larger (the few huge entries real LLM
matrices have).

Both runs use the command line as a user would (`jax-signedcut compress --rate
0.5`, and `--distributed` with 2 processes on localhost); reported: wall time
of the layer, peak resident memory of each process, whether the 2-process output
is bit-identical to the single-process one, and projections: the whole model
(32 layers; embeddings and head kept dense) on one such machine and on N machines
(the work splits by matrix, balanced by cost, so about 1/N of it per machine).

Usage:
  python benchmarks/mistral_layer_benchmark.py --scale 32     # a quick smoke run
  python benchmarks/mistral_layer_benchmark.py                 # full size: about an hour

``--scale S`` divides every dimension by S (a smoke test of the pipeline; the
kernel's work per matrix shrinks like S³ — m·n·width — so its timings do not
project to the real model, and the projection is then marked as such).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

LAYERS = 32
SHAPES = {
    "self_attn.q_proj.weight": (4096, 4096),
    "self_attn.k_proj.weight": (1024, 4096),
    "self_attn.v_proj.weight": (1024, 4096),
    "self_attn.o_proj.weight": (4096, 4096),
    "mlp.gate_proj.weight": (14336, 4096),
    "mlp.up_proj.weight": (14336, 4096),
    "mlp.down_proj.weight": (4096, 14336),
}
NORMS = {"input_layernorm.weight": 4096, "post_attention_layernorm.weight": 4096}


def make_layer(path, scale, seed=0):
  """Writes the synthetic layer to ``path`` (bf16, as the checkpoint stores it)."""
  import ml_dtypes  # noqa: PLC0415
  from safetensors.numpy import save_file  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  tensors = {}
  for name, (m, n) in SHAPES.items():
    m, n = max(16, m // scale), max(16, n // scale)
    a = rng.standard_t(4, (m, n)).astype(np.float32) * np.float32(0.02 / np.sqrt(2.0))
    k = max(1, a.size // 100_000)
    idx = rng.choice(a.size, k, replace=False)
    a.reshape(-1)[idx] *= 40
    tensors[f"model.layers.0.{name}"] = a.astype(ml_dtypes.bfloat16)
  for name, n in NORMS.items():
    tensors[f"model.layers.0.{name}"] = np.ones(max(16, n // scale), ml_dtypes.bfloat16)
  save_file(tensors, path)
  return {k: v.shape for k, v in tensors.items()}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(commands):
  """Runs the commands side by side: (wall seconds, [peak RSS MiB of each])."""
  t0 = time.perf_counter()
  procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
           for c in commands]
  peaks = []
  for p in procs:
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode()
    p.stderr.close()
    if p.returncode != 0:
      raise SystemExit(f"{' '.join(commands[0][:4])} failed: {err[-2000:]}")
    peaks.append(usage.ru_maxrss / 1024)      # KiB on Linux
  return time.perf_counter() - t0, peaks


def _same(file, outdir):
  from jax_signedcut._checkpoint import reader as _reader  # noqa: PLC0415
  from jax_signedcut._checkpoint import sharded as _sharded  # noqa: PLC0415

  with _reader.Reader(file) as a, _sharded.ShardedReader(outdir) as b:
    ta = {n: a.tensor(n).tobytes() for n in a._f.keys()}  # noqa: SLF001
    tb = {}
    for r in b._readers:  # noqa: SLF001
      tb.update({n: r.tensor(n).tobytes() for n in r._f.keys()})  # noqa: SLF001
    return ta == tb and a.entries == b.entries


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--scale", type=int, default=1, help="divide every dimension by this")
  p.add_argument("--rate", type=float, default=0.5)
  p.add_argument("--processes", type=int, default=2)
  args = p.parse_args()
  exe = [sys.executable, "-m", "jax_signedcut._cli", "compress"]
  with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "layer.safetensors")
    shapes = make_layer(src, args.scale)
    one = os.path.join(d, "one.safetensors")
    t1, m1 = _run([exe + [src, one, "--rate", str(args.rate), "-q"]])
    outdir = os.path.join(d, "many")
    port = _free_port()
    n = args.processes
    tn, mn = _run([exe + [src, outdir, "--rate", str(args.rate), "-q", "--distributed",
                          "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                          "--process-id", str(i)] for i in range(n)])
    same = _same(one, outdir)
  entries = sum(int(np.prod(s)) for s in shapes.values())
  print(f"Mistral-7B decoder layer{'' if args.scale == 1 else f' at 1/{args.scale} scale'}: "
        f"{len(shapes)} leaves, {entries / 1e6:.2f} M entries, rate {args.rate}, "
        f"{os.cpu_count()} CPU cores")
  print()
  print("| run | wall time / layer | peak RSS per process | bit-identical |")
  print("|---|---|---|---|")
  print(f"| 1 process | {t1:.1f} s | {m1[0]:.0f} MiB | (reference) |")
  print(f"| {n} processes | {tn:.1f} s | {' / '.join(f'{m:.0f}' for m in mn)} MiB | "
        f"{'yes' if same else 'NO'} |")
  note = "" if args.scale == 1 else f" (at 1/{args.scale} scale: not the real model's time)"
  print()
  print(f"projection, {LAYERS} layers{note}: one process on this machine "
        f"{t1 * LAYERS / 3600:.2f} h; {n} processes here {tn * LAYERS / 3600:.2f} h; "
        + "; ".join(f"{k} such machines ≈ {t1 * LAYERS / k / 3600:.2f} h" for k in (8, 32, 128)))
  if not same:
    raise SystemExit("the 2-process output differs from the single-process one")


if __name__ == "__main__":
  main()
