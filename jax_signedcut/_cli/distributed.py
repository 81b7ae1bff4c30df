"""``jax-signedcut compress --distributed``: one checkpoint compressed by many processes.

Every process runs the same command (with its own ``--process-id``) under
``jax.distributed.initialize``. The leaves are assigned before any work, by
their cost (≈ batch·m·n·width, greedy longest-processing-time first, ties by
checkpoint order: the same assignment in every process). Each process
compresses its leaves one at a time exactly as the single-process command does
(the key of a leaf derives from its path, not its position, so the factors are
bit-identical) and writes its shard file ``model-0000i-of-0000N.safetensors``
into OUTDIR; once every shard is complete process 0 writes the index
(``_checkpoint/sharded.py``).

Resumable: each finished leaf is first written to its own file under
``OUTDIR/.parts/`` and recorded in the process's journal
(``OUTDIR/.journal-0000i-of-0000N.jsonl``: leaf, part file, the part's CRC-32, and
a fingerprint of the arguments). A run started again with the same arguments
skips the leaves whose part file still has the recorded CRC and produces the
same bytes; a finished shard is recorded too and not rewritten.

Completion is seen through OUTDIR (which all processes must share): each process
waits until every journal records its shard before it shuts down, so that
process 0, which hosts the coordination service, stays up until the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zlib

from jax_signedcut._cli import interrupts as _interrupts
from jax_signedcut._cli.args import CliError

#: Environment variables read when a flag is not given (first match wins): our own, then
#: the names ``jax.distributed`` documents for cluster launchers.
ENV = {
    "coordinator": ("JAX_SIGNEDCUT_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("JAX_SIGNEDCUT_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("JAX_SIGNEDCUT_PROCESS_ID", "JAX_PROCESS_ID"),
}
PARTS = ".parts"
#: How long (seconds) a process waits for the others' shards before giving up.
WAIT_S = float(os.environ.get("JAX_SIGNEDCUT_SHARD_WAIT_S", 7 * 24 * 3600))


def add_arguments(c) -> None:
  """The ``--distributed`` flags of ``compress``."""
  g = c.add_argument_group("distributed (OUT is then a directory of shards; see "
                           "docs/distributed.md)")
  g.add_argument("--distributed", action="store_true",
                 help="compress with several processes into the directory OUT (shard files "
                 "+ index); resumable")
  g.add_argument("--coordinator", metavar="HOST:PORT",
                 help="address of process 0's coordination service "
                 "(env JAX_SIGNEDCUT_COORDINATOR or JAX_COORDINATOR_ADDRESS)")
  g.add_argument("--num-processes", type=int, metavar="N",
                 help="number of processes (env JAX_SIGNEDCUT_NUM_PROCESSES or "
                 "JAX_NUM_PROCESSES; default 1)")
  g.add_argument("--process-id", type=int, metavar="I",
                 help="this process, 0..N-1 (env JAX_SIGNEDCUT_PROCESS_ID or JAX_PROCESS_ID)")


def run_compress(args) -> int:
  """``compress``: the sharded run with ``--distributed``, else the single-file command."""
  from jax_signedcut._cli import compress as _compress  # noqa: PLC0415

  given = [f for f in ("coordinator", "num_processes", "process_id")
           if getattr(args, f, None) is not None]
  if not getattr(args, "distributed", False):
    if given:
      raise CliError(f"--{given[0].replace('_', '-')} needs --distributed")
    return _compress.run(args)
  return run(args)


def _env(name):
  for var in ENV[name]:
    v = os.environ.get(var)
    if v not in (None, ""):
      return v, var
  return None, None


def cluster(args) -> tuple[str | None, int, int]:
  """``(coordinator, num_processes, process_id)`` from the flags, else the environment."""
  out = {}
  for name in ENV:
    v, where = getattr(args, name), f"--{name.replace('_', '-')}"
    if v is None:
      v, var = _env(name)
      where = var or where
    if v is not None and name != "coordinator":
      try:
        v = int(v)
      except ValueError:
        raise CliError(f"{where} must be an integer, got {v!r}") from None
    out[name] = (v, where)
  n, n_where = out["num_processes"]
  n = 1 if n is None else n
  if n < 1:
    raise CliError(f"{n_where} must be >= 1, got {n}")
  i, i_where = out["process_id"]
  if i is None:
    if n > 1:
      raise CliError(f"--process-id is needed with {n} processes (or set {ENV['process_id'][0]})")
    i = 0
  if not 0 <= i < n:
    raise CliError(f"{i_where} must be in 0..{n - 1} for {n} processes, got {i}")
  coord, c_where = out["coordinator"]
  if n > 1:
    if coord is None:
      raise CliError(f"--coordinator HOST:PORT is needed with {n} processes (or set "
                     f"{ENV['coordinator'][0]})")
    host, _, port = coord.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise CliError(f"{c_where} must be HOST:PORT, got {coord!r}")
  return coord, n, i


def leaf_cost(job, shape) -> int:
  """The assignment's cost of one leaf, known before any work: batch·m·n·width for signed
  cuts (the kernel's time grows like it), batch·m·n·bits for other methods, the entry
  count for a leaf kept as it is."""
  import math  # noqa: PLC0415

  from jax_signedcut._signedcut import budget as _budget  # noqa: PLC0415

  size = math.prod(shape)
  if job is None:
    return size
  if (job.method or "signed_cut") == "signed_cut":
    m, n = shape[-2:]
    w = _budget.resolve_width(m, n, width=job.width, rate=job.rate,
                              bits_per_weight=job.bits_per_weight)
    return size * max(1, w)
  bits = job.bits_per_weight if job.bits_per_weight is not None else 16 * (job.rate or 1)
  return size * max(1, math.ceil(bits))


def assign(costs: list[int], n: int) -> list[int]:
  """The process of each leaf: longest processing time first onto the least loaded process
  (ties: the earlier leaf first, the lower process id). Deterministic.

  Example:
    >>> assign([5, 1, 4, 4], 2)
    [0, 0, 1, 1]
  """
  load = [0] * n
  owner = [0] * len(costs)
  for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
    p = min(range(n), key=lambda p: (load[p], p))
    owner[i] = p
    load[p] += costs[i]
  return owner


def _file_crc(path) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


class Journal:
  """The completed leaves (and shard) of one process: a JSON-lines file in OUTDIR.

  A line is appended (and fsync'd) only after the file it names is complete on
  disk; a line cut short by a kill is ignored, as are lines of another
  configuration.
  """

  def __init__(self, outdir, pid, n, fingerprint):
    from jax_signedcut._checkpoint import sharded as _sharded  # noqa: PLC0415

    self.outdir, self.fingerprint = outdir, fingerprint
    self.path = journal_path(outdir, pid, n)
    self.shard = _sharded.shard_name(pid, n)
    self.leaves, self.shard_crc = read_journal(self.path, fingerprint)

  def _append(self, rec):
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"config": self.fingerprint, **rec}, separators=(",", ":")) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def part_ok(self, leaf_path) -> str | None:
    """The part file of a leaf recorded as done and still intact, else None."""
    rec = self.leaves.get(leaf_path)
    if rec is None:
      return None
    f = os.path.join(self.outdir, PARTS, rec["part"])
    return f if os.path.exists(f) and _file_crc(f) == rec["crc32"] else None

  def shard_ok(self) -> bool:
    f = os.path.join(self.outdir, self.shard)
    return self.shard_crc is not None and os.path.exists(f) and _file_crc(f) == self.shard_crc

  def add_leaf(self, leaf_path, part_file):
    rec = {"leaf": leaf_path, "part": os.path.relpath(part_file, os.path.join(self.outdir, PARTS)),
           "crc32": _file_crc(part_file)}
    self._append(rec)
    self.leaves[leaf_path] = rec

  def add_shard(self):
    self.shard_crc = _file_crc(os.path.join(self.outdir, self.shard))
    self._append({"shard": self.shard, "crc32": self.shard_crc})


def journal_path(outdir, pid, n) -> str:
  return os.path.join(outdir, f".journal-{pid + 1:05d}-of-{n:05d}.jsonl")


def read_journal(path, fingerprint) -> tuple[dict, int | None]:
  leaves, shard = {}, None
  if not os.path.exists(path):
    return leaves, shard
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue          # the last line of a killed run
      if not isinstance(rec, dict) or rec.get("config") != fingerprint:
        continue
      if "leaf" in rec:
        leaves[rec["leaf"]] = rec
      elif "shard" in rec:
        shard = rec["crc32"]
  return leaves, shard


def _encode(src, i, job, args, key, arg_options):
  """Leaf ``i`` compressed and encoded exactly as ``compress.run`` does it."""
  from jax_signedcut._cli import compress as _compress  # noqa: PLC0415

  return _compress.encode_leaf(src, i, job, args, key, arg_options)


def _fingerprint(user, entries, n, backend) -> str:
  """What a resumed run must share with the first: arguments, leaves and process count."""
  body = json.dumps({"user": user, "n": n, "backend": backend,
                     "leaves": [[p, list(s), str(d)] for _, p, s, d in entries]},
                    sort_keys=True, default=str)
  return hashlib.sha256(body.encode()).hexdigest()[:16]


def _init_cluster(coord, n, pid) -> None:
  import jax  # noqa: PLC0415

  if n == 1:
    return
  try:
    jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)
  except Exception as e:  # noqa: BLE001  (XLA raises its own runtime errors)
    raise CliError(f"jax.distributed.initialize(coordinator_address={coord!r}, "
                   f"num_processes={n}, process_id={pid}) failed: {e}") from None


def _done_leaves(outdir, n, fingerprint) -> int:
  """The leaves every process's journal records as done (for the progress bar)."""
  return sum(len(read_journal(journal_path(outdir, p, n), fingerprint)[0]) for p in range(n))


def _wait_for_shards(outdir, n, fingerprint, quiet) -> None:
  """Blocks until every process's journal records its finished shard."""
  deadline = time.monotonic() + WAIT_S
  said = False
  while True:
    done = [read_journal(journal_path(outdir, p, n), fingerprint)[1] is not None
            for p in range(n)]
    if all(done):
      return
    if not said and not quiet:
      print(f"jax-signedcut: waiting for the shards of processes "
            f"{[p for p in range(n) if not done[p]]}", file=sys.stderr)
      said = True
    if time.monotonic() > deadline:
      raise CliError(f"gave up after {WAIT_S:.0f} s waiting for the shards of processes "
                     f"{[p for p in range(n) if not done[p]]}")
    time.sleep(0.2)


def run(args) -> int:
  coord, n, pid = cluster(args)
  outdir = args.output
  if getattr(args, "calibration", None):
    raise CliError("--calibration is not supported with --distributed yet; compress with "
                   "calibration statistics in one process")
  if os.path.exists(outdir) and not os.path.isdir(outdir):
    raise CliError(f"{outdir}: exists and is not a directory; with --distributed OUT is the "
                   "directory of the shards")
  _init_cluster(coord, n, pid)   # before any JAX computation
  try:
    return _run(args, outdir, n, pid)
  finally:
    if n > 1:
      import jax  # noqa: PLC0415
      jax.distributed.shutdown()


def _run(args, outdir, n, pid) -> int:
  import jax  # noqa: PLC0415

  from jax_signedcut._checkpoint import format as _format  # noqa: PLC0415
  from jax_signedcut._checkpoint import reader as _reader  # noqa: PLC0415
  from jax_signedcut._checkpoint import sharded as _sharded  # noqa: PLC0415
  from jax_signedcut._checkpoint import writer as _writer  # noqa: PLC0415
  from jax_signedcut._cli import compress as _compress  # noqa: PLC0415
  from jax_signedcut._cli import sources as _sources  # noqa: PLC0415
  from jax_signedcut._cli.args import check_method_args, default_budget  # noqa: PLC0415

  check_method_args(args)
  default = default_budget(args)
  rules = list(args.rule or [])
  if default is None and not any(b is not None for _, b in rules):
    raise CliError("no budget: give --rate, --bits, --width or --max-error (or a --rule with a "
                   "budget)")
  arg_options = dict(args.option or [])
  key = jax.random.key(args.seed)
  own = os.path.join(outdir, PARTS, f"{pid + 1:05d}")
  os.makedirs(own, exist_ok=True)
  for name in os.listdir(own):        # the temporaries of a killed run
    if name.startswith((".spool-", ".partial-")):
      os.unlink(os.path.join(own, name))
  with _sources.open_source(args.input) as src:
    plan, caught = _compress.plan_leaves(src, args, rules, default)
    if pid == 0:
      for w in caught:
        print(f"jax-signedcut: warning: {w.message}", file=sys.stderr)
    jobs = dict(zip(plan.paths, plan.jobs))
    user = _compress.user_metadata(args, default, rules, arg_options)
    fingerprint = _fingerprint(user, src.entries, n, args.backend)
    owner = assign([leaf_cost(jobs.get(p), s) for _, p, s, _ in src.entries], n)
    mine = [i for i in range(len(src.entries)) if owner[i] == pid]
    journal = Journal(outdir, pid, n, fingerprint)
    _interrupts.STATE.resumable = outdir   # a Ctrl-C from here on keeps what is journaled
    if not journal.shard_ok():
      bar = _compress.progress(len(mine), f"compress [{pid + 1}/{n}]", args.quiet)
      parts = []
      try:
        for i in mine:
          path = src.entries[i][1]
          part = journal.part_ok(path)
          if part is None:
            if not args.quiet:
              bar.set_postfix_str(f"{path} (all processes: "
                                  f"{_done_leaves(outdir, n, fingerprint)}/{len(owner)} leaves)")
            tensors, entry = _encode(src, i, jobs.get(path), args, key, arg_options)
            part = os.path.join(own, f"{i:06d}.safetensors")
            with _writer.Writer(part) as w:
              for name, t in tensors:
                w.add(name, t)
              del tensors
              w.finish(_format.header_metadata([entry], w.crc32, {}))
            journal.add_leaf(path, part)
            _compress.release_memory()
          parts.append(part)
          bar.update(1)
      finally:
        bar.close()
      # The shard: the parts' tensors and entries in checkpoint order.
      shard_user = dict(user, shard=pid, num_shards=n)
      staged = os.path.join(own, journal.shard)
      with _writer.Writer(staged) as w:
        entries = []
        for part in parts:
          with _reader.Reader(part) as r:
            for name in r._f.keys():  # noqa: SLF001
              w.add(name, r.tensor(name))
            entries.extend(r.entries)
        w.finish(_format.header_metadata(entries, w.crc32, shard_user))
      os.replace(staged, os.path.join(outdir, journal.shard))
      journal.add_shard()
      for part in parts:
        os.unlink(part)
      os.rmdir(own)
  _wait_for_shards(outdir, n, fingerprint, args.quiet)
  if pid == 0:
    names = [_sharded.shard_name(p, n) for p in range(n)]
    _sharded.write_index(outdir, names, [p for _, p, _, _ in src.entries], user)
    try:
      os.rmdir(os.path.join(outdir, PARTS))
    except OSError:
      pass
    if not args.quiet:
      with _sharded.open_reader(outdir, verify=False) as r:
        from jax_signedcut._cli import table as _table  # noqa: PLC0415
        _table.summary(r.entries)
      print(f"wrote {outdir} ({n} shard(s) and {_sharded.INDEX})")
  return 0
