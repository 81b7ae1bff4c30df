"""The CLI under signals and concurrency: SIGKILL leaves nothing that reads as output and the next
run cleans up; SIGINT always ends a run with one line and exit 130, even when something swallows
the KeyboardInterrupt; a second writer of one output fails at once.

Two subprocesses in all (a kill and an interrupt), each bounded by a timeout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

import jax_signedcut as sc
from jax_signedcut._checkpoint import writer as _writer
from jax_signedcut._cli.main import main
from jax_signedcut._signedcut import decompose as _decompose

TEMP = re.compile(r"\.out\.safetensors\.\d+\.[a-z0-9_]+\.(spool|partial)\.tmp")


@pytest.fixture
def model(tmp_path):
  rng = np.random.default_rng(0)
  save_file({f"l{i}.weight": rng.standard_normal((256, 256)).astype(np.float32)
             for i in range(6)}, str(tmp_path / "in.safetensors"))
  return tmp_path


def start(d):
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  return subprocess.Popen(
      [sys.executable, "-m", "jax_signedcut._cli", "compress", "in.safetensors",
       "out.safetensors", "--width", "200", "-q"], cwd=d, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def wait_for_spool(proc, d, timeout=90):
  """Waits until the run has its own spool file (it is writing), or fails the test."""
  mine = f".out.safetensors.{proc.pid}."
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if any(TEMP.fullmatch(n) and n.startswith(mine) for n in os.listdir(d)):
      return
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.01)
  proc.kill()
  pytest.fail("the run never started writing")


@pytest.fixture
def procs():
  started = []
  yield started
  for p in started:     # a failed assertion must not leave a run behind
    if p.poll() is None:
      p.kill()
    p.communicate()


def test_sigkill_leaves_no_output_and_the_next_run_cleans_up(model, procs):
  proc = start(model)
  procs.append(proc)
  wait_for_spool(proc, model)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  left = set(os.listdir(model)) - {"in.safetensors"}
  assert "out.safetensors" not in left
  assert left and all(TEMP.fullmatch(n) or n == ".out.safetensors.lock" for n in left), left
  with pytest.raises(FileNotFoundError):
    sc.load(model / "out.safetensors")
  # The next run removes what the killed one left; interrupted in turn (SIGINT), it ends with
  # the one line and exit 130 and leaves nothing of its own either.
  proc = start(model)
  procs.append(proc)
  wait_for_spool(proc, model)
  stale = [n for n in left if n != ".out.safetensors.lock"]
  assert not set(stale) & set(os.listdir(model))
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  assert err.strip().splitlines() == ["jax-signedcut: interrupted; no output was written"], err
  assert sorted(os.listdir(model)) == ["in.safetensors"]


def test_a_swallowed_interrupt_still_ends_the_run(model, capsys, monkeypatch):
  real = _decompose._decompose_leaf  # noqa: SLF001
  sent = []

  def swallowing(*args, **kwargs):
    if not sent:
      sent.append(1)
      try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)      # (the handler runs here)
      except KeyboardInterrupt:
        pass               # what a destructor or a callback does with it
    return real(*args, **kwargs)

  monkeypatch.setattr(_decompose, "_decompose_leaf", swallowing)
  code = main(["compress", str(model / "in.safetensors"), str(model / "out.safetensors"),
               "--width", "4", "-q"])
  err = capsys.readouterr().err
  assert code == 130
  assert err.strip().splitlines() == ["jax-signedcut: interrupted; no output was written"]
  assert sorted(os.listdir(model)) == ["in.safetensors"]
  assert signal.getsignal(signal.SIGINT) is not None   # the previous handler is back


def test_two_writers_of_one_output(model, capsys):
  out = model / "out.safetensors"
  with _writer.Writer(out):     # a live writer of out (the lock is per open file: same process)
    code = main(["compress", str(model / "in.safetensors"), str(out), "--width", "4", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert f"{out}: another process (pid {os.getpid()}) is writing this output" in err
    with pytest.raises(FileExistsError, match="another process"):
      sc.save(out, {"a": np.ones(3, np.float32)})
  assert sorted(os.listdir(model)) == ["in.safetensors"]   # lock and spool gone
  sc.save(out, {"a": np.ones(3, np.float32)})              # free again
  assert sorted(os.listdir(model)) == ["in.safetensors", "out.safetensors"]


def test_stale_temporaries_of_other_outputs_are_kept(tmp_path):
  keep = [".out.safetensors.x.123.abcdefgh.spool.tmp", ".other.safetensors.12.abcdefgh.spool.tmp",
          ".spool-abc.tmp", "out.safetensors.12.abcdefgh.spool.tmp"]
  gone = [".out.safetensors.12.abcdefgh.spool.tmp", ".out.safetensors.7.a_b3.partial.tmp"]
  for n in keep + gone:
    (tmp_path / n).write_bytes(b"x")
  sc.save(tmp_path / "out.safetensors", {"a": np.ones(2, np.float32)})
  assert sorted(os.listdir(tmp_path)) == sorted([*keep, "out.safetensors"])


def test_expand_to_orbax_removes_a_killed_runs_directory(tmp_path, capsys):
  sc.save(tmp_path / "c.safetensors", {"b": np.arange(3.0, dtype=np.float32)})
  stale = tmp_path / ".dense.99.abcdefgh.partial.tmp"
  (stale / "ckpt").mkdir(parents=True)
  code = main(["expand", str(tmp_path / "c.safetensors"), str(tmp_path / "dense"), "-q"])
  assert code == 0, capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "dense"]
  np.testing.assert_array_equal(sc.load_orbax(tmp_path / "dense")["b"], np.arange(3.0))


def test_interrupt_while_jax_is_still_importing(tmp_path, procs):
  # The console entry point imports the package (and JAX, about a second)
  # inside main(): a Ctrl-C then still gets the one line and 130, not a traceback.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, HF_HUB_OFFLINE="1",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  code = ("import sys; print('ready', flush=True); import jax_signedcut_cli; "
          "sys.exit(jax_signedcut_cli.main())")
  p = subprocess.Popen([sys.executable, "-c", code, "inspect", "no-such.safetensors"],
                       cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  procs.append(p)
  assert p.stdout.readline() == "ready\n"
  time.sleep(0.15)            # inside `import jax_signedcut` (it takes ~1 s here)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=60)
  assert p.returncode == 130, (p.returncode, err)
  assert err.strip().splitlines() == ["jax-signedcut: interrupted; no output was written"], err


@pytest.mark.parametrize("where", ["lock", "spool", "partial", "rename"])
def test_an_interrupt_between_creating_a_file_and_recording_it(model, capsys, monkeypatch, where):
  """A SIGINT that lands right after a temporary (or the lock) is created, or right after the
  rename, is held until the writer knows the name: the run still ends with the one line and 130,
  and nothing of it is left but a complete output. (CI once found a spool left this way: the
  signal landed between mkstemp creating it and the writer recording its name.)"""
  import tempfile
  sent = []

  def interrupt_after(real):
    def wrapped(*args, **kwargs):
      result = real(*args, **kwargs)
      if not sent:
        sent.append(1)
        signal.raise_signal(signal.SIGINT)   # the handler runs at the next instruction
      return result
    return wrapped

  if where == "lock":
    monkeypatch.setattr(_writer, "_lock", interrupt_after(_writer._lock))  # noqa: SLF001
  elif where == "rename":
    monkeypatch.setattr(_writer.os, "replace", interrupt_after(os.replace))
  else:
    real = tempfile.mkstemp

    def mkstemp(*args, suffix=None, **kwargs):
      f = interrupt_after(real) if suffix == f".{where}.tmp" else real
      return f(*args, suffix=suffix, **kwargs)
    monkeypatch.setattr(_writer.tempfile, "mkstemp", mkstemp)
  code = main(["compress", str(model / "in.safetensors"), str(model / "out.safetensors"),
               "--width", "4", "-q"])
  err = capsys.readouterr().err
  assert sent and code == 130, err
  if where == "rename":   # the rename had happened: the output is complete and said to be kept
    assert err.strip().splitlines() == [
        f"jax-signedcut: interrupted; {model / 'out.safetensors'} was complete and is kept"]
    assert sorted(os.listdir(model)) == ["in.safetensors", "out.safetensors"]
    assert len(sc.load(model / "out.safetensors")) == 6
  else:
    assert err.strip().splitlines() == ["jax-signedcut: interrupted; no output was written"]
    assert sorted(os.listdir(model)) == ["in.safetensors"]


def test_a_writer_not_entered_refuses_to_write_and_leaves_nothing(tmp_path):
  w = _writer.Writer(tmp_path / "out.safetensors")   # no lock, no spool until `with`
  assert os.listdir(tmp_path) == []
  with pytest.raises(RuntimeError, match="open the Writer with `with Writer"):
    w.add("a", np.ones(3, np.float32))
  with pytest.raises(RuntimeError, match="open the Writer with `with Writer"):
    w.finish({})
  assert os.listdir(tmp_path) == []
