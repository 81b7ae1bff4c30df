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
(``OUTDIR/.journal-0000i-of-0000N.jsonl``: leaf, part file, the part's CRC-32, the
CRC-32 of the leaf's input bytes, and a fingerprint of the arguments). A run
started again with the same arguments skips the leaves whose part file still has
the recorded CRC and whose input still has the recorded CRC, and produces the
same bytes; a finished shard is recorded too (with the CRCs of its inputs) and
not rewritten.

Completion goes through ``jax.distributed``'s coordination service: each process
sets its status key (``jax_signedcut/status/<i>``: done, or why it failed) in the
service's key-value store, and waits for every process's status before it shuts
down (so that process 0, which hosts the service, writes the index and stays up
until the end); a process that failed, or one that has not finished within
``JAX_SIGNEDCUT_SHARD_WAIT_S``, is named in the error. The leaves done by all
processes together (for the progress bars) are a counter in the same store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
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
#: The environment variable bounding how long (seconds) a process waits for the others'
#: shards before giving up (default a week).
WAIT_ENV, WAIT_DEFAULT_S = "JAX_SIGNEDCUT_SHARD_WAIT_S", 7 * 24 * 3600
#: The keys of this tool in the coordination service's key-value store.
KV_STATUS, KV_DONE = "jax_signedcut/status/", "jax_signedcut/leaves_done"
DONE = "done"


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


def array_crc(a) -> int:
  """The CRC-32 of an array's bytes (C order), without a copy when it is contiguous."""
  import numpy as np  # noqa: PLC0415

  return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


class _Recording:
  """A source that records the CRC-32 of each leaf it reads (the input a part was made of)."""

  def __init__(self, src):
    self._src, self.entries, self.crc = src, src.entries, {}

  def get(self, i):
    a = self._src.get(i)
    self.crc[i] = array_crc(a)
    return a


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

  def part_ok(self, leaf_path, input_crc) -> str | None:
    """The part file of a leaf recorded as done from an input with CRC ``input_crc`` and
    still intact, else None."""
    rec = self.leaves.get(leaf_path)
    if rec is None or rec.get("input_crc32") != input_crc:
      return None
    f = os.path.join(self.outdir, PARTS, rec["part"])
    return f if os.path.exists(f) and _file_crc(f) == rec["crc32"] else None

  def shard_ok(self, input_crcs) -> bool:
    """Whether the shard is recorded as made from inputs with CRCs ``input_crcs`` (in the
    order of its leaves) and is still intact."""
    if self.shard_crc is None or self.shard_crc[1] != list(input_crcs):
      return False
    f = os.path.join(self.outdir, self.shard)
    return os.path.exists(f) and _file_crc(f) == self.shard_crc[0]

  def add_leaf(self, leaf_path, part_file, input_crc):
    rec = {"leaf": leaf_path, "part": os.path.relpath(part_file, os.path.join(self.outdir, PARTS)),
           "crc32": _file_crc(part_file), "input_crc32": input_crc}
    self._append(rec)
    self.leaves[leaf_path] = rec

  def add_shard(self, input_crcs):
    crc = _file_crc(os.path.join(self.outdir, self.shard))
    self.shard_crc = (crc, list(input_crcs))
    self._append({"shard": self.shard, "crc32": crc, "input_crc32": list(input_crcs)})


def journal_path(outdir, pid, n) -> str:
  return os.path.join(outdir, f".journal-{pid + 1:05d}-of-{n:05d}.jsonl")


def read_journal(path, fingerprint) -> tuple[dict, tuple[int, list] | None]:
  """The journal's leaf records by leaf path, and its last shard record as ``(CRC of the
  shard, CRCs of its inputs)`` (None if none); lines of another configuration are skipped."""
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
        shard = (rec["crc32"], rec.get("input_crc32"))
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


def wait_seconds() -> float:
  """How long a process waits for the others' shards: ``JAX_SIGNEDCUT_SHARD_WAIT_S``."""
  v = os.environ.get(WAIT_ENV, "")
  try:
    s = float(v) if v else WAIT_DEFAULT_S
  except ValueError:
    raise CliError(f"{WAIT_ENV} must be a number of seconds, got {v!r}") from None
  if not s > 0:
    raise CliError(f"{WAIT_ENV} must be > 0, got {v!r}")
  return s


class Peers:
  """The other processes of the run, through the coordination service of ``jax.distributed``
  (its key-value store). ``client`` None: no service, this process alone (one process,
  or processes run one after another, process 0 last, as a test does).

  ``client`` is a ``DistributedRuntimeClient`` (JAX exposes the one of
  ``jax.distributed.initialize`` only as ``jax._src.distributed.global_state.client``).
  """

  def __init__(self, client, pid, n):
    self.client, self.pid, self.n, self._local = client, pid, n, 0

  def add_done(self, k: int) -> int:
    """Counts ``k`` more leaves done by this process; the total of all processes."""
    if self.client is None:
      self._local += k
      return self._local
    return self.client.key_value_increment(KV_DONE, k)

  def set_status(self, status: str) -> None:
    """This process's status: ``DONE`` once its shard is complete, else why it stopped."""
    if self.client is not None:
      self.client.key_value_set(f"{KV_STATUS}{self.pid}", status, allow_overwrite=True)

  def statuses(self) -> dict[int, str]:
    """The statuses set so far, by process."""
    if self.client is None:
      return {}
    return {int(k.rpartition("/")[2]): v for k, v in self.client.key_value_dir_get(KV_STATUS)}

  def wait_all_done(self, timeout_s: float, quiet: bool = True, check_s: float = 5.0) -> None:
    """Blocks until every process's status is set; a CliError naming the processes that
    failed (seen within ``check_s``), or the ones that did not finish within ``timeout_s``."""
    if self.client is None:
      return
    import jax  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    if not quiet:
      waiting = [p for p in range(self.n) if p not in self.statuses()]
      if waiting:
        print(f"jax-signedcut: waiting for the shards of processes {waiting}", file=sys.stderr)
    p = 0
    while p < self.n:
      left = deadline - time.monotonic()
      try:   # returns as soon as process p's status is set
        status = self.client.blocking_key_value_get(
            f"{KV_STATUS}{p}", max(1, int(min(left, check_s) * 1000)))
      except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):
          raise CliError(f"waiting for the shard of process {p}: {e}") from None
        seen = self.statuses()          # another process may have failed meanwhile
        self._raise_failed(seen)
        if left <= check_s:
          raise CliError(f"gave up after {timeout_s:g} s ({WAIT_ENV}) waiting for the shards "
                         f"of processes {[q for q in range(self.n) if q not in seen]} of "
                         f"{self.n}") from None
        continue
      if status != DONE:
        self._raise_failed(self.statuses())
      p += 1

  def _raise_failed(self, seen):
    failed = {q: v for q, v in sorted(seen.items()) if v != DONE}
    if failed:
      raise CliError("processes " + str(list(failed)) + " failed: " + "; ".join(
          f"process {q}: {v}" for q, v in failed.items()))


def run(args) -> int:
  coord, n, pid = cluster(args)
  outdir = args.output
  if getattr(args, "calibration", None) or getattr(args, "allocate", False):
    raise CliError("--calibration / --allocate are not supported with --distributed yet; compress with "
                   "calibration statistics in one process")
  if os.path.exists(outdir) and not os.path.isdir(outdir):
    raise CliError(f"{outdir}: exists and is not a directory; with --distributed OUT is the "
                   "directory of the shards")
  _init_cluster(coord, n, pid)   # before any JAX computation
  peers = Peers(_client() if n > 1 else None, pid, n)
  try:
    return _run(args, outdir, peers)
  except BaseException as e:
    # The others wait for this process's status: tell them why it stopped.
    why = "interrupted" if isinstance(e, KeyboardInterrupt) else (
        str(e) or type(e).__name__)
    with contextlib.suppress(Exception):   # the service may be gone too; the error is e
      peers.set_status(why if why != DONE else f"failed ({why})")
    raise
  finally:
    if n > 1:
      import jax  # noqa: PLC0415
      jax.distributed.shutdown()


def _client():
  """The coordination service client of ``jax.distributed.initialize``."""
  from jax._src import distributed as _jax_distributed  # noqa: PLC0415  (no public API yet)

  return _jax_distributed.global_state.client


def _run(args, outdir, peers) -> int:
  import jax  # noqa: PLC0415

  from jax_signedcut._checkpoint import format as _format  # noqa: PLC0415
  from jax_signedcut._checkpoint import reader as _reader  # noqa: PLC0415
  from jax_signedcut._checkpoint import sharded as _sharded  # noqa: PLC0415
  from jax_signedcut._checkpoint import writer as _writer  # noqa: PLC0415
  from jax_signedcut._cli import compress as _compress  # noqa: PLC0415
  from jax_signedcut._cli import sources as _sources  # noqa: PLC0415
  from jax_signedcut._cli.args import check_method_args, default_budget  # noqa: PLC0415

  n, pid = peers.n, peers.pid
  check_method_args(args)
  default = default_budget(args)
  rules = list(args.rule or [])
  if default is None and not any(b is not None for _, b in rules):
    raise CliError("no budget: give --rate, --bits, --width or --max-error (or a --rule with a "
                   "budget)")
  if pid == 0:
    _compress.warn_oversized(default, rules)
  arg_options = dict(args.option or [])
  key = jax.random.key(args.seed)
  own = os.path.join(outdir, PARTS, f"{pid + 1:05d}-of-{n:05d}")
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
    reading = _Recording(src)           # the CRC of each input leaf read

    def input_crc(i):                   # leaf i's input as it is now
      return reading.crc[i] if i in reading.crc else array_crc(reading.get(i))

    if journal.shard_crc is None or not journal.shard_ok([input_crc(i) for i in mine]):
      # A recorded part counts only if it was made from the input as it is now.
      parts = {i: f for i in mine if src.entries[i][1] in journal.leaves
               and (f := journal.part_ok(src.entries[i][1], input_crc(i))) is not None}
      total = peers.add_done(len(parts))
      bar = _compress.progress(len(mine), f"compress [{pid + 1}/{n}]", args.quiet)
      bar.update(len(parts))
      try:
        for i in (i for i in mine if i not in parts):
          path = src.entries[i][1]
          if not args.quiet:
            bar.set_postfix_str(f"{path} (all processes: {total}/{len(owner)} leaves)")
          tensors, entry = _encode(reading, i, jobs.get(path), args, key, arg_options)
          part = os.path.join(own, f"{i:06d}.safetensors")
          with _writer.Writer(part) as w:
            for name, t in tensors:
              w.add(name, t)
            del tensors
            w.finish(_format.header_metadata([entry], w.crc32, {}))
          journal.add_leaf(path, part, input_crc(i))
          parts[i] = part
          _compress.release_memory()
          total = peers.add_done(1)
          bar.update(1)
      finally:
        bar.close()
      parts = [parts[i] for i in mine]
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
      journal.add_shard([input_crc(i) for i in mine])
    # Only parts of this process (of runs with these N processes) are in own: done with.
    shutil.rmtree(own)
  peers.set_status(DONE)
  peers.wait_all_done(wait_seconds(), args.quiet)
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
