"""``jax-signedcut compress --distributed``: assignment, sharded output, journal and resume.

The in-process tests run one process (``--num-processes 1``), and test the wait
for the other processes against a coordination service with clients in threads;
the last test starts 2 and then 4 processes on localhost (``jax.distributed``),
kills the 2-process run midway and resumes it, and compares each output byte for
byte with what this process writes running the N processes' parts in turn (itself
compared with the one single-process reference). Processes that import JAX are
the cost of this file: 8 of them in all.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jax
import jax_signedcut as sc
from jax_signedcut._checkpoint import reader as _reader
from jax_signedcut._checkpoint import sharded as _sharded
from jax_signedcut._cli import distributed as _dist
from jax_signedcut._cli import interrupts as _interrupts
from jax_signedcut._cli import sources as _sources
from jax_signedcut._cli.args import CliError
from jax_signedcut._cli.main import build_parser, main

ARGS = ["--width", "8", "-q"]
ENCODE = _dist._encode  # noqa: SLF001


def _count_leaves(monkeypatch, stop_after=None):
  """The indices of the leaves compressed from now on (a list that grows); with
  ``stop_after``, a KeyboardInterrupt instead of the leaf after that many."""
  calls = []

  def encode(src, i, *a):
    if stop_after is not None and len(calls) == stop_after:
      raise KeyboardInterrupt
    calls.append(i)
    return ENCODE(src, i, *a)

  monkeypatch.setattr(_dist, "_encode", encode)
  return calls


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A small multi-leaf checkpoint (two leaves of each of two shapes, a stack, a bias) and its single-process
  compression."""
  d = tmp_path_factory.mktemp("ckpt")
  rng = np.random.default_rng(0)
  t = {f"layer{i}.w": rng.standard_normal((32 + 8 * (i % 2), 24)).astype(np.float32) for i in range(4)}
  t["stack"] = rng.standard_normal((3, 24, 40)).astype(np.float32)
  t["heavy"] = rng.standard_t(2, (40, 32)).astype(np.float32)
  t["bias"] = rng.standard_normal(24).astype(np.float32)
  src = str(d / "in.safetensors")
  save_file(t, src)
  ref = str(d / "ref.safetensors")
  assert main(["compress", src, ref, *ARGS]) == 0
  return src, ref


def _tensors(path):
  """{tensor name: bytes} and the leaf entries of a file or a sharded directory."""
  with _sharded.open_reader(path) as r:
    readers = r._readers if isinstance(r, _sharded.ShardedReader) else [r]  # noqa: SLF001
    out = {}
    for rr in readers:
      out.update({n: rr.tensor(n).tobytes() for n in rr._f.keys()})  # noqa: SLF001
    return out, r.entries


def assert_same_as(ref, outdir):
  t1, e1 = _tensors(ref)
  t2, e2 = _tensors(outdir)
  assert e1 == e2
  assert t1 == t2
  a, b = sc.load(ref), sc.load(outdir)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_assign_balances_by_cost_deterministically():
  assert _dist.assign([5, 1, 4, 4], 2) == [0, 0, 1, 1]
  costs = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
  owner = _dist.assign(costs, 3)
  loads = [sum(c for c, o in zip(costs, owner) if o == p) for p in range(3)]
  assert max(loads) - min(loads) <= 1 and sum(loads) == sum(costs)
  assert _dist.assign(costs, 3) == owner
  assert _dist.assign([3], 4) == [0]


def test_cluster_flags_and_environment(monkeypatch):
  class A:
    coordinator = None
    num_processes = None
    process_id = None

  for var in (v for vs in _dist.ENV.values() for v in vs):
    monkeypatch.delenv(var, raising=False)
  assert _dist.cluster(A()) == (None, 1, 0)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:1234")
  monkeypatch.setenv("JAX_SIGNEDCUT_NUM_PROCESSES", "3")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  assert _dist.cluster(A()) == ("host:1234", 3, 2)
  a = A()
  a.process_id = 3
  with pytest.raises(CliError, match=r"--process-id must be in 0..2 for 3 processes, got 3"):
    _dist.cluster(a)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "nohost")
  with pytest.raises(CliError, match="JAX_COORDINATOR_ADDRESS must be HOST:PORT, got 'nohost'"):
    _dist.cluster(A())


def test_flags_need_distributed(ckpt, tmp_path, capsys):
  src, _ = ckpt
  assert main(["compress", src, str(tmp_path / "o.safetensors"), "--num-processes", "2",
               *ARGS]) == 1
  assert "--num-processes needs --distributed" in capsys.readouterr().err
  f = tmp_path / "file"
  f.write_text("x")
  assert main(["compress", src, str(f), "--distributed", *ARGS]) == 1
  assert "exists and is not a directory" in capsys.readouterr().err
  assert main(["compress", src, str(tmp_path / "d"), "--distributed", "--calibration",
               str(tmp_path / "stats.safetensors"), *ARGS]) == 1
  assert "--calibration / --allocate are not supported with --distributed" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "d")


def test_one_process_sharded_output_matches_and_resumes(ckpt, tmp_path, monkeypatch, capsys):
  src, ref = ckpt
  out = str(tmp_path / "out")
  assert main(["compress", src, out, "--distributed", *ARGS]) == 0
  assert_same_as(ref, out)
  assert sorted(os.listdir(out)) == [".journal-00001-of-00001.jsonl",
                                     "model-00001-of-00001.safetensors", _sharded.INDEX]
  index = json.loads(pathlib.Path(out, _sharded.INDEX).read_text())
  assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
  assert sc.load_info(out)["user"]["seed"] == 0
  # inspect and expand read the directory
  assert main(["inspect", out]) == 0
  assert "heavy" in capsys.readouterr().out
  assert main(["expand", out, str(tmp_path / "d.safetensors"), "-q"]) == 0
  assert main(["expand", ref, str(tmp_path / "r.safetensors"), "-q"]) == 0
  d, r = _reader.TensorFile(tmp_path / "d.safetensors"), _reader.TensorFile(tmp_path / "r.safetensors")
  assert d.keys() == r.keys() and all(np.array_equal(d.get(k), r.get(k)) for k in d.keys())
  d.close()
  r.close()

  # Interrupted after 3 leaves, then resumed: only the rest is compressed, same bytes.
  again = str(tmp_path / "again")
  calls = _count_leaves(monkeypatch, stop_after=3)
  capsys.readouterr()
  assert main(["compress", src, again, "--distributed", *ARGS]) == 130
  # The one line says the finished leaves are kept (not "no output was written").
  assert capsys.readouterr().err.strip().splitlines() == [
      f"jax-signedcut: interrupted; the leaves finished so far are kept in {again} and the "
      "same command resumes from them"]
  assert not os.path.exists(os.path.join(again, _sharded.INDEX))
  with pytest.raises(sc.CheckpointError, match="incomplete sharded output"):
    sc.load(again)
  first = list(calls)
  plain = tmp_path / "plain"
  plain.mkdir()
  (plain / "model.safetensors.index.json").write_text('{"weight_map": {}}')
  with pytest.raises(sc.CheckpointError, match="not a jax_signedcut index .* input for"):
    sc.load(plain)
  # A damaged part file is recompressed, not trusted.
  part = os.path.join(again, _dist.PARTS, "00001-of-00001", f"{first[0]:06d}.safetensors")
  data = bytearray(pathlib.Path(part).read_bytes())
  data[-1] ^= 0xFF
  pathlib.Path(part).write_bytes(bytes(data))
  calls = _count_leaves(monkeypatch)
  assert main(["compress", src, again, "--distributed", *ARGS]) == 0
  assert sorted(calls) == sorted([first[0], *(i for i in range(7) if i not in first)])
  for name in ("model-00001-of-00001.safetensors", _sharded.INDEX):
    assert pathlib.Path(out, name).read_bytes() == pathlib.Path(again, name).read_bytes()
  assert not os.path.exists(os.path.join(again, _dist.PARTS))
  # Run again: the shard is complete, nothing is compressed.
  calls.clear()
  assert main(["compress", src, again, "--distributed", *ARGS]) == 0
  assert calls == []
  assert not os.path.exists(os.path.join(again, _dist.PARTS))


def test_resume_recompresses_the_leaves_whose_input_changed(ckpt, tmp_path, monkeypatch):
  src, ref = ckpt
  mine = str(tmp_path / "in.safetensors")
  pathlib.Path(mine).write_bytes(pathlib.Path(src).read_bytes())
  out = str(tmp_path / "out")
  calls = _count_leaves(monkeypatch, stop_after=2)
  assert main(["compress", mine, out, "--distributed", *ARGS]) == 130
  first = list(calls)
  # Same names, shapes and dtypes, so the same arguments' fingerprint; one done leaf changed.
  t = load_file(src)
  with _sources.open_source(src) as f:
    name = f.entries[first[0]][1]
  save_file(dict(t, **{name: t[name][::-1].copy()}), mine)
  ref2 = str(tmp_path / "ref2.safetensors")
  assert main(["compress", mine, ref2, *ARGS]) == 0
  calls = _count_leaves(monkeypatch)
  assert main(["compress", mine, out, "--distributed", *ARGS]) == 0
  # The changed leaf is compressed again, the unchanged finished one is not.
  assert first[0] in calls and first[1] not in calls
  assert_same_as(ref2, out)
  # A finished shard of another input is not kept either.
  save_file(t, mine)
  calls.clear()
  assert main(["compress", mine, out, "--distributed", *ARGS]) == 0
  assert sorted(calls) == list(range(len(t)))
  assert_same_as(ref, out)


def test_distributed_warns_about_a_rate_above_bf16(tmp_path, capsys):
  src = str(tmp_path / "bias.safetensors")
  save_file({"bias": np.ones(8, np.float32)}, src)
  assert main(["compress", src, str(tmp_path / "d"), "--distributed", "--rate", "2", "-q"]) == 0
  assert "warning: default budget: rate 2 is more than a bf16 copy" in capsys.readouterr().err


@pytest.fixture
def service():
  """A coordination service of 3 processes and its 3 connected clients (in this process)."""
  from jax._src.lib import _jax  # noqa: PLC0415

  addr = f"127.0.0.1:{_free_port()}"
  svc = _jax.get_distributed_runtime_service(addr, 3)
  clients = [_jax.get_distributed_runtime_client(addr, p, init_timeout=60) for p in range(3)]

  def all_at_once(method):
    ts = [threading.Thread(target=getattr(c, method)) for c in clients]
    for t in ts:
      t.start()
    for t in ts:
      t.join()

  all_at_once("connect")           # connect() returns once all 3 have connected
  yield clients
  all_at_once("shutdown")
  svc.shutdown()


def test_peers_wait_names_failed_and_unfinished_processes(service):
  peers = [_dist.Peers(c, p, 3) for p, c in enumerate(service)]
  assert [peers[0].add_done(2), peers[1].add_done(1), peers[2].add_done(0)] == [2, 3, 3]
  peers[0].set_status(_dist.DONE)
  t0 = time.monotonic()
  with pytest.raises(CliError, match=r"gave up after 0.3 s \(JAX_SIGNEDCUT_SHARD_WAIT_S\) "
                     r"waiting for the shards of processes \[1, 2\] of 3"):
    peers[0].wait_all_done(0.3)
  assert time.monotonic() - t0 < 5
  # A failure is seen while an earlier process is still working (within check_s).
  peers[2].set_status("interrupted")
  t0 = time.monotonic()
  with pytest.raises(CliError, match=r"processes \[2\] failed: process 2: interrupted"):
    peers[0].wait_all_done(60, check_s=0.2)
  assert time.monotonic() - t0 < 5
  peers[2].set_status(_dist.DONE)
  peers[1].set_status(_dist.DONE)
  peers[1].wait_all_done(1)
  assert peers[0].statuses() == {0: "done", 1: "done", 2: "done"}


def test_a_failing_process_tells_the_others(service, tmp_path, monkeypatch):
  # Process 1 of 3 in this process, on the service's client 1: its error becomes its status.
  monkeypatch.setattr(_dist, "_init_cluster", lambda *a: None)
  monkeypatch.setattr(_dist, "_client", lambda: service[1])
  monkeypatch.setattr(jax.distributed, "shutdown", lambda: None)
  missing = str(tmp_path / "missing.safetensors")
  assert main(["compress", missing, str(tmp_path / "d"), *ARGS, "--distributed", "--coordinator",
               "127.0.0.1:1", "--num-processes", "3", "--process-id", "1"]) == 1
  peers = _dist.Peers(service[0], 0, 3)
  status = peers.statuses()
  assert list(status) == [1] and "missing.safetensors" in status[1]
  with pytest.raises(CliError, match=r"processes \[1\] failed: process 1: .*missing"):
    peers.wait_all_done(30, check_s=0.2)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(src, out, n):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return [subprocess.Popen(
      [sys.executable, "-m", "jax_signedcut._cli", "compress", src, out, *ARGS,
       "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
       "--process-id", str(p)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      for p in range(n)]


def _wait(procs, timeout=120):
  for p in procs:
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err.decode()[-2000:]


def _in_turn(src, outdir, n) -> dict:
  """What ``n`` processes write, from this process running each in turn (no coordination
  service; process 0 last, as it writes the index): ``{file name: bytes}`` of the shard
  files and the index."""
  args = build_parser().parse_args(["compress", src, outdir, *ARGS, "--distributed"])
  try:
    for pid in reversed(range(n)):
      assert _dist._run(args, outdir, _dist.Peers(None, pid, n)) == 0
  finally:
    _interrupts.STATE.resumable = None
  names = [*(_sharded.shard_name(p, n) for p in range(n)), _sharded.INDEX]
  return {name: pathlib.Path(outdir, name).read_bytes() for name in names}


def _same_files(expected: dict, outdir):
  for name, data in expected.items():
    assert pathlib.Path(outdir, name).read_bytes() == data, name


def test_two_and_four_processes_match_one_and_resume_after_kill(ckpt, tmp_path):
  src, ref = ckpt
  # The bytes n processes must write: each in turn here, the same tensors as one process.
  expected = {}
  for n in (2, 4):
    expected[n] = _in_turn(src, str(tmp_path / f"in_turn{n}"), n)
    assert_same_as(ref, str(tmp_path / f"in_turn{n}"))

  # 2 processes, killed once the first leaf is journaled (before any shard is complete),
  # then resumed.
  killed = str(tmp_path / "killed")
  procs = _start(src, killed, 2)
  deadline = time.monotonic() + 120
  journals = [_dist.journal_path(killed, p, 2) for p in range(2)]

  def lines():
    return [ln for j in journals if os.path.exists(j) for ln in pathlib.Path(j).read_text().splitlines()]

  while not any('"leaf"' in ln for ln in lines()):
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise AssertionError([p.communicate()[1].decode()[-1000:] for p in procs])
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.communicate()
  assert not any('"shard"' in ln for ln in lines())     # it really was cut short
  _wait(_start(src, killed, 2))
  _same_files(expected[2], killed)

  # 4 processes, every one with leaves of its own.
  four = str(tmp_path / "four")
  _wait(_start(src, four, 4))
  _same_files(expected[4], four)
  index = json.loads(expected[4][_sharded.INDEX])
  assert len(set(index["weight_map"].values())) == 4
  assert sorted(os.listdir(four)) == sorted(
      [*(os.path.basename(_dist.journal_path(four, p, 4)) for p in range(4)), *expected[4]])
