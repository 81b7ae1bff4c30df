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
  python benchmarks/mistral_layer_benchmark.py --cuts 129      # full size, 129 cuts each: minutes

``--scale S`` divides every dimension by S (a smoke test of the pipeline; the
kernel's work per matrix shrinks like S³ — m·n·width — so its timings do not
project to the real model, and the projection is then marked as such).

``--cuts K`` measures instead of running the whole layer: every matrix at full
size, K cuts each (the path ``compress`` takes: ``_decompose_leaf`` with the
default outliers), in 1 process and then in 2 processes side by side (the
matrices assigned as ``--distributed`` assigns them), each cut's time read from
the kernel's cut counter, and in the same processes a full read of each matrix
(``jnp.sum(a)``, jitted, median of 5) as the baseline. The time of a whole layer
at the rate is then a PROJECTION: width(rate) × the measured time per cut, plus
each matrix's measured fixed cost (compile, outlier selection, copies). It rests
on the greedy's cost per cut being flat in the cut index (every cut runs the
same alternation on the residual, with one flush of the pending block every 32
cuts), which the run checks on its own cuts: the time per cut of the first and
of the last (K−1)/2 cuts, over whole 32-cut blocks.
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


def synthetic(rng, m, n):
  """One synthetic weight matrix (bf16): Student-t(4) scaled to std 0.02, 1 in 10⁵ × 40."""
  import ml_dtypes  # noqa: PLC0415

  a = rng.standard_t(4, (m, n)).astype(np.float32) * np.float32(0.02 / np.sqrt(2.0))
  k = max(1, a.size // 100_000)
  idx = rng.choice(a.size, k, replace=False)
  a.reshape(-1)[idx] *= 40
  return a.astype(ml_dtypes.bfloat16)


def make_layer(path, scale, seed=0):
  """Writes the synthetic layer to ``path`` (bf16, as the checkpoint stores it)."""
  import ml_dtypes  # noqa: PLC0415
  from safetensors.numpy import save_file  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  tensors = {}
  for name, (m, n) in SHAPES.items():
    m, n = max(16, m // scale), max(16, n // scale)
    tensors[f"model.layers.0.{name}"] = synthetic(rng, m, n)
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


BLOCK = 32      # the kernel's pending block: one flush pass every 32 cuts (xla_ffi/kernel.h)


def _stamped_decompose(x, key, cuts):
  """``x`` decomposed with ``cuts`` cuts on the path ``compress`` takes; returns (seconds in
  all, [(cuts done, wall s, process CPU s)] read from the kernel's counter as cuts land)."""
  import threading  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from jax_signedcut._core import progress as _progress  # noqa: PLC0415
  from jax_signedcut._signedcut import decompose as _decompose  # noqa: PLC0415

  base = _progress.cuts_done()
  if base is None:
    raise SystemExit("--cuts needs the C++ extension (its cut counter)")
  stamps, stop = [], threading.Event()

  def watch():                  # until the last cut is seen (the call may return first)
    last = 0
    while last < cuts:
      c = _progress.cuts_done() - base
      if c != last:
        stamps.append((c, time.perf_counter(), time.process_time()))
        last = c
      elif stop.is_set():
        break
      time.sleep(0.002)

  th = threading.Thread(target=watch, daemon=True)
  t0 = time.perf_counter()
  th.start()
  f = _decompose._decompose_leaf(x, key=key, width=cuts, outliers="auto", donate=True)  # noqa: SLF001
  jax.block_until_ready(f)
  total = time.perf_counter() - t0
  stop.set()
  th.join()
  return total, [(c, w - t0, p) for c, w, p in stamps]


def _at(stamps, c):
  """The first stamp at or after ``c`` cuts."""
  return next(s for s in stamps if s[0] >= c)


def worker(names, cuts, out):
  """Measures the matrices ``names`` (``--cuts`` mode, one process); writes JSON to ``out``."""
  import json  # noqa: PLC0415
  import resource  # noqa: PLC0415
  import zlib  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  load0 = os.getloadavg()
  total_sum = jax.jit(jnp.sum)
  rows = {}
  for name in names:
    m, n = SHAPES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = jnp.asarray(synthetic(rng, m, n).astype(np.float32))
    total_sum(x).block_until_ready()               # compile, and the pages touched
    reads = []
    for _ in range(5):
      t = time.perf_counter()
      total_sum(x).block_until_ready()
      reads.append(time.perf_counter() - t)
    total, stamps = _stamped_decompose(x, jax.random.key(zlib.crc32(name.encode())), cuts)
    del x
    blocks = (cuts - 1) // BLOCK                    # whole 32-cut blocks after the first cut
    first, mid, last = _at(stamps, 1), _at(stamps, 1 + BLOCK * (blocks // 2)), \
        _at(stamps, 1 + BLOCK * blocks)

    def per_cut(a, b):
      return (b[1] - a[1]) / (b[0] - a[0]), (b[2] - a[2]) / (b[0] - a[0])

    rows[name] = {
        "read_s": float(np.median(reads)), "total_s": total,
        "cut_s": per_cut(first, last)[0], "cut_cpu_s": per_cut(first, last)[1],
        "first_half_cut_s": per_cut(first, mid)[0], "last_half_cut_s": per_cut(mid, last)[0],
        "first_half_cut_cpu_s": per_cut(first, mid)[1],
        "last_half_cut_cpu_s": per_cut(mid, last)[1],
        # what is not cuts: compile, outlier selection, copies, the first cut's start
        "fixed_s": total - cuts * per_cut(first, last)[0]}
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "peak_mib": peak, "load": [load0, os.getloadavg()]}, f)


def _makespan(times, costs, k):
  """The longest of ``k`` processes when ``--distributed`` assigns these jobs by their costs."""
  from jax_signedcut._cli import distributed as _dist  # noqa: PLC0415

  owner = _dist.assign(costs, k)
  return max(sum(t for t, o in zip(times, owner) if o == p) for p in range(k))


def cuts_main(args):
  """``--cuts K``: per-cut times at full size, and the projection from them."""
  import json  # noqa: PLC0415

  from jax_signedcut._cli import distributed as _dist  # noqa: PLC0415
  from jax_signedcut._signedcut import budget as _budget  # noqa: PLC0415

  if args.cuts < 2 * BLOCK + 1:
    raise SystemExit(f"--cuts must be at least {2 * BLOCK + 1} (two 32-cut blocks after the "
                     f"first cut), got {args.cuts}")
  names = list(SHAPES)
  width = {k: _budget.resolve_width(*SHAPES[k], rate=args.rate) for k in names}
  cost = [SHAPES[k][0] * SHAPES[k][1] * width[k] for k in names]
  owner = _dist.assign(cost, 2)
  me = [sys.executable, os.path.abspath(__file__), "--cuts", str(args.cuts)]
  with tempfile.TemporaryDirectory() as d:
    def measure(groups):
      outs = [os.path.join(d, f"{len(groups)}-{i}.json") for i in range(len(groups))]
      _, peaks = _run([me + ["--worker", ",".join(g), "--out", o] for g, o in zip(groups, outs)])
      res = []
      for o, pk in zip(outs, peaks):
        with open(o, encoding="utf-8") as f:
          res.append(dict(json.load(f), peak_wait4_mib=pk))
      return res

    up0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    one = measure([names])
    two = measure([[k for k, o in zip(names, owner) if o == p] for p in range(2)])
    up1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  r1 = one[0]["rows"]
  r2 = {k: v for w in two for k, v in w["rows"].items()}
  proj1 = {k: width[k] * r1[k]["cut_s"] + r1[k]["fixed_s"] for k in names}
  proj2 = {k: width[k] * r2[k]["cut_s"] + r2[k]["fixed_s"] for k in names}
  # With a core of its own per process: the CPU time per cut instead of the wall time.
  cpu1 = {k: width[k] * r1[k]["cut_cpu_s"] + r1[k]["fixed_s"] for k in names}
  cpu2 = {k: width[k] * r2[k]["cut_cpu_s"] + r2[k]["fixed_s"] for k in names}
  print(f"Mistral-7B decoder layer, full size, {args.cuts} cuts per matrix measured; rate "
        f"{args.rate} projected; {os.cpu_count()} CPU cores; {time.strftime('%Y-%m-%d %H:%M %Z')}")
  print(f"uptime before: {up0}")
  print(f"uptime after:  {up1}")
  print()
  print("| matrix | m × n | cuts at rate | full read (jnp.sum) | per cut, 1 proc: wall (CPU) | "
        "per cut ÷ read | first ÷ last half: wall (CPU) | per cut, 2 procs: wall (CPU) | "
        "fixed s (1 proc) | projected, 1 proc: wall (CPU) |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for k in names:
    a, b = r1[k], r2[k]
    print(f"| {k.split('.')[1]} | {SHAPES[k][0]}×{SHAPES[k][1]} | {width[k]} | "
          f"{a['read_s'] * 1e3:.1f} ms | {a['cut_s'] * 1e3:.1f} ({a['cut_cpu_s'] * 1e3:.1f}) ms | "
          f"{a['cut_s'] / a['read_s']:.2f} | {a['first_half_cut_s'] / a['last_half_cut_s']:.2f} "
          f"({a['first_half_cut_cpu_s'] / a['last_half_cut_cpu_s']:.2f}) | "
          f"{b['cut_s'] * 1e3:.1f} ({b['cut_cpu_s'] * 1e3:.1f}) ms | {a['fixed_s']:.1f} | "
          f"{proj1[k] / 60:.1f} ({cpu1[k] / 60:.1f}) min |")
  print()
  print("| run | peak RSS per process | load average (start → end) |")
  print("|---|---|---|")
  for label, res in (("1 process", one), ("2 processes", two)):
    peaks = " / ".join(f"{w['peak_wait4_mib']:.0f}" for w in res)
    loads = " ; ".join(f"{w['load'][0][0]:.1f} → {w['load'][1][0]:.1f}" for w in res)
    print(f"| {label} | {peaks} MiB | {loads} |")
  def layer(proj, k):
    return _makespan([proj[n] for n in names], cost, k)
  print()
  print(f"PROJECTION at rate {args.rate} (width × measured time per cut + measured fixed "
        "cost; not a measured layer):")
  print()
  print("| what | 1 process: wall (CPU) | 2 processes on this machine: wall (CPU) |")
  print("|---|---:|---:|")

  def cell(t1, t2, unit, div):
    return f"{t1 / div:.{unit}f} ({t2 / div:.{unit}f})"

  print(f"| one decoder layer, min | {cell(layer(proj1, 1), layer(cpu1, 1), 0, 60)} | "
        f"{cell(layer(proj2, 2), layer(cpu2, 2), 0, 60)} |")
  print(f"| whole model ({LAYERS} layers), h | "
        f"{cell(layer(proj1, 1) * LAYERS, layer(cpu1, 1) * LAYERS, 1, 3600)} | "
        f"{cell(layer(proj2, 2) * LAYERS, layer(cpu2, 2) * LAYERS, 1, 3600)} |")

  costs = cost * LAYERS

  def model(proj, k):
    return _makespan([proj[n] for _ in range(LAYERS) for n in names], costs, k)

  for machines in (8, 32, 128):
    print(f"| whole model, {machines} such machines, h | "
          f"{cell(model(proj1, machines), model(cpu1, machines), 2, 3600)} | "
          f"{cell(model(proj2, 2 * machines), model(cpu2, 2 * machines), 2, 3600)} |")
  print()
  print(f"Whole model: the {LAYERS} layers' {LAYERS * len(names)} matrices (embeddings and head "
        "kept dense); N machines: N × (1 or 2) processes, the matrices assigned by cost as "
        "--distributed does. CPU: as if every process had a core of its own (the kernel runs "
        "one thread per matrix); wall: at this run's load.")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--scale", type=int, default=1, help="divide every dimension by this")
  p.add_argument("--rate", type=float, default=0.5)
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--cuts", type=int, help="measure K cuts of every full-size matrix and "
                 "project the rate's time from them (see the module docstring)")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args.worker.split(","), args.cuts, args.out)
  if args.cuts is not None:
    return cuts_main(args)
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
