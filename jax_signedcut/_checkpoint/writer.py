"""Writing a checkpoint: leaves encoded one at a time, the file renamed into place when complete."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import zlib

import jax
import numpy as np

from jax_signedcut._checkpoint import codec as _codec
from jax_signedcut._checkpoint import format as _format
from jax_signedcut._checkpoint import structure as _structure
from jax_signedcut._checkpoint import types as _types  # noqa: F401  (registers the codecs)
from jax_signedcut._core import keypath as _keypath
from jax_signedcut._core.protocol import is_compressed


def encode_leaf(comps, leaf, *, extra: dict | None = None) -> tuple[list, dict]:
  """Tensors ``[(name, np.ndarray)]`` and the metadata entry of one leaf.

  Raises:
    TypeError: traced values, a dtype safetensors cannot store, or a
      compressed type with no registered codec.
    ValueError: a compressed value with NaN or Inf in a float field.
  """
  path = _keypath.join(comps)
  entry: dict = {"key": comps, "path": path}
  if is_compressed(leaf):
    try:
      node, tensors = _codec.encode(leaf, path)
    except ValueError as e:
      raise ValueError(f"leaf {path!r}: {e}") from None
    entry.update(kind="compressed", type=node["type"], shape=[int(d) for d in leaf.shape],
                 batch_shape=[int(d) for d in leaf.batch_shape], nbytes=int(leaf.nbytes),
                 value=node)
  else:
    if isinstance(leaf, jax.core.Tracer):
      raise TypeError("save needs concrete arrays: call it outside jax.jit")
    a = np.asarray(leaf)
    if a.dtype not in _format.CODES:
      raise TypeError(f"leaf {path!r}: dtype {a.dtype} cannot be stored in safetensors")
    entry.update(kind="array", tensor=path, dtype=str(a.dtype), shape=list(a.shape))
    tensors = [(path, a)]
  if extra:
    entry.update(extra)
  return tensors, entry


#: Temporary files of a writer of OUT: ``.OUT.<pid>.<random>.spool.tmp`` (the tensors as
#: they come) and ``.OUT.<pid>.<random>.partial.tmp`` (the file being assembled).
_TEMP = r"\d+\.[a-z0-9_]+\.(spool|partial)\.tmp"


@contextlib.contextmanager
def deferred_interrupts():
  """Holds a SIGINT that comes inside the block until the block ends, then delivers it.

  For the few calls that create (or rename) a file and record its name: a
  ``KeyboardInterrupt`` between the two would leave a file that nothing removes.
  Python runs signal handlers in the main thread only, so the handler is swapped
  for one that records the signal. (Blocking the signal with ``pthread_sigmask``
  does not hold it: the kernel hands a process-wide SIGINT to another thread, one
  of XLA's, and Python still runs the handler in the main thread at its next
  instruction.) Outside the main thread, or when the handler is not a Python one
  (ignored, default, set from C), the block runs as it is.
  """
  previous = signal.getsignal(signal.SIGINT)
  if threading.current_thread() is not threading.main_thread() or not callable(previous):
    yield
    return
  pending = []
  signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    if pending:
      previous(signal.SIGINT, pending[0])


def _lock_name(path: str) -> str:
  d, base = os.path.split(os.path.abspath(path))
  return os.path.join(d, f".{base}.lock")


def _lock(path: str) -> int:
  """An exclusive ``flock`` on OUT's lock file (holding our pid); FileExistsError if taken."""
  name = _lock_name(path)
  for _ in range(20):
    fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
      os.close(fd)
      raise FileExistsError(f"{path}: another process (pid {holder}) is writing this output; "
                            "wait for it to finish or write elsewhere") from None
    except BaseException:
      os.close(fd)
      raise
    try:   # the previous holder may have removed the file after we opened it
      same = os.stat(name).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
      return fd
    os.close(fd)
  raise FileExistsError(f"{path}: could not lock {name}")


def _remove_stale(path: str) -> None:
  """Removes the temporaries a killed writer of OUT left (we hold OUT's lock: none is live).

  Files, and the directories an orbax output is assembled in.
  """
  d, base = os.path.split(os.path.abspath(path))
  pattern = re.compile(re.escape(f".{base}.") + _TEMP)
  with contextlib.suppress(OSError):
    for name in os.listdir(d):
      if pattern.fullmatch(name):
        full = os.path.join(d, name)
        if os.path.isdir(full) and not os.path.islink(full):
          shutil.rmtree(full, ignore_errors=True)
        else:
          with contextlib.suppress(FileNotFoundError):
            os.unlink(full)


def temp_prefix(path: str) -> str:
  """The prefix of this process's temporaries for OUT (``mkstemp``/``mkdtemp`` add the rest)."""
  return f".{os.path.basename(os.path.abspath(path))}.{os.getpid()}."


@contextlib.contextmanager
def output_lock(path):
  """Holds OUT's lock (FileExistsError if another writer holds it) after removing stale
  temporaries; for outputs not written by :class:`Writer` (an orbax directory)."""
  path = _format.file_path(path)
  fd = None
  try:
    with deferred_interrupts():
      fd = _lock(path)
    _remove_stale(path)
    yield
  finally:
    if fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_name(path))
      os.close(fd)


def _fsync_dir(d: str) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(d, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


class Writer:
  """Writes a safetensors file one tensor at a time, atomically.

  Tensors are appended to a spool file as they come (so only one is in memory
  at a time); :meth:`finish` writes the header and the data to a temporary
  file in the destination's directory, fsyncs it and ``os.replace`` s it onto
  the destination. An exception (or Ctrl-C) before that leaves no output file
  and removes the temporaries; a process killed outright (SIGKILL) leaves only
  temporaries named ``.OUT.<pid>.<random>.{spool,partial}.tmp``, which nothing
  reads as output, and the next writer of OUT removes them.

  A writer (``with Writer(OUT) as w:``) holds an exclusive lock on ``.OUT.lock``
  (``fcntl.flock``, released by the kernel when the process dies) from entry to
  exit: a second writer of the same OUT, in this process or another, fails at
  once with ``FileExistsError`` naming the pid that holds it.
  """

  def __init__(self, path):
    self.path = _format.file_path(path)
    d = os.path.dirname(os.path.abspath(self.path))
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{self.path}: the directory {d} does not exist")
    if os.path.isdir(self.path):
      raise IsADirectoryError(f"{self.path}: is a directory; name the output file")
    self._dir = d
    self._prefix = temp_prefix(self.path)
    self._lock_fd = None
    self._spool = None
    self._spool_name = None
    self._header: dict = {}
    self._crc: dict = {}
    self._offset = 0

  def __enter__(self):
    # The lock and the spool are made here, not in __init__: a Ctrl-C between
    # ``Writer(...)`` and the start of ``__enter__`` then finds nothing to remove,
    # and one inside is held until the names are recorded and cleaned up below.
    try:
      with deferred_interrupts():
        self._lock_fd = _lock(self.path)
        _remove_stale(self.path)
        fd, self._spool_name = tempfile.mkstemp(prefix=self._prefix, suffix=".spool.tmp",
                                                dir=self._dir)
        self._spool = os.fdopen(fd, "wb")
    except BaseException:
      self._cleanup()
      raise
    return self

  def __exit__(self, exc_type, exc, tb):
    self._cleanup()

  def _unlock(self):
    if self._lock_fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_name(self.path))   # while still holding it (see _lock)
      os.close(self._lock_fd)
      self._lock_fd = None

  def _cleanup(self):
    with deferred_interrupts():
      if self._spool is not None and not self._spool.closed:
        self._spool.close()
      if self._spool_name is not None:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(self._spool_name)
      self._unlock()

  def _require_open(self):
    if self._spool is None:
      raise RuntimeError(f"{self.path}: open the Writer with `with Writer(path) as w:` first")

  def add(self, name: str, array) -> None:
    """Appends one tensor."""
    self._require_open()
    if name in self._header or name == "__metadata__":
      raise ValueError(f"{self.path}: two tensors named {name!r} (or a reserved name)")
    a = np.ascontiguousarray(array)
    if a.dtype not in _format.CODES:
      raise TypeError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
    data = _format.bytes_view(a)     # no copy: the array may be the largest in the file
    self._spool.write(data)
    self._header[name] = {"dtype": _format.CODES[a.dtype], "shape": list(a.shape),
                          "data_offsets": [self._offset, self._offset + a.nbytes]}
    self._crc[name] = zlib.crc32(data)
    self._offset += a.nbytes

  @property
  def crc32(self) -> dict:
    return dict(self._crc)

  def finish(self, metadata: dict[str, str], *, commit=None) -> None:
    """Writes header + data and renames the result onto the destination.

    A jax_signedcut file (``metadata["format"]``) gets its header checksum here.
    ``commit``: a context manager factory the rename runs in (the CLI's guard
    against Ctrl-C).
    """
    self._require_open()
    self._spool.close()
    header = dict(self._header)
    if metadata.get("format") == _format.FORMAT:
      metadata = dict(metadata)
      metadata[_format.HEADER_CRC] = _format.header_checksum(self._header, metadata)
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    tmp = out = None
    try:
      with deferred_interrupts():
        fd, tmp = tempfile.mkstemp(prefix=self._prefix, suffix=".partial.tmp", dir=self._dir)
        out = os.fdopen(fd, "wb")
      with out, open(self._spool_name, "rb") as spool:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        shutil.copyfileobj(spool, out, 1 << 22)
        out.flush()
        os.fsync(out.fileno())
      os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the usual mode
      with commit() if commit is not None else contextlib.nullcontext():
        os.replace(tmp, self.path)
      _fsync_dir(self._dir)
    except BaseException:
      if out is not None:
        out.close()
      if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(tmp)
      raise
    finally:
      self._cleanup()


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def save(path, tree, *, metadata: dict | None = None) -> None:
  """Saves a pytree of compressed values and arrays to a safetensors file.

  Every compressed type (signed cuts, sums of parts, RTN codes, LPLR/DSVD/ℓp
  factors, tensor cuts) is stored by its registered codec; only the used cut
  and sparse slots are written. The file is written to a temporary name,
  fsynced and renamed, so an interrupted (or killed) save leaves no partial
  file; see :class:`Writer` for the lock and the temporaries.

  Args:
    path: destination file (conventionally ``*.safetensors``).
    tree: a pytree (dicts, lists, tuples, ``nnx.State``, …) whose leaves are
      compressed values or arrays of a safetensors dtype.
    metadata: JSON-serialisable dict stored in the header (``load_info`` gives
      it back under ``"user"``).

  Raises:
    TypeError: a leaf of an unsupported type/dtype, or traced values.
    ValueError: two leaves that would share a tensor name, a compressed
      value with a NaN or Inf in a float field (its scales ``c``, …; naming
      the leaf and the field), or metadata that is not JSON-serialisable.
    FileExistsError: another writer (in this process or another) is writing
      ``path`` now.

  Example:
    >>> import jax, tempfile, os
    >>> import jax_signedcut as sc
    >>> a = jax.random.normal(jax.random.key(0), (32, 32))
    >>> tree = {"w": sc.decompose(a, key=jax.random.key(1), rate=0.5), "q": sc.rtn(a, bits=4),
    ...         "b": jax.numpy.ones(32)}
    >>> p = os.path.join(tempfile.mkdtemp(), "f.safetensors")
    >>> sc.save(p, tree)
    >>> back = sc.load(p)
    >>> bool((back["q"].codes == tree["q"].codes).all()), back["b"].shape
    (True, (32,))
  """
  try:
    json.dumps(metadata or {})
  except (TypeError, ValueError) as e:
    raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
  with Writer(path) as w:
    entries = []
    for comps, leaf in _structure.flatten(tree):
      tensors, entry = encode_leaf(comps, leaf)
      for name, a in tensors:
        w.add(name, a)
      entries.append(entry)
    w.finish(_format.header_metadata(entries, w.crc32, metadata))
