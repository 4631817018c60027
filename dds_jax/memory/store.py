"""A persistent memory of certificates: SQLite (standard library) + RAM index.

One file holds one memory, for one dataset, model, input shape, dtype and
norm. Every certificate is a row of `certificates`; its `id` is its position
in query order (1, 2, ...). The inputs are also held in RAM in a
`rule.MemoryIndex`, which applies the rule.

Concurrency and crash safety:
  * `insert` is ONE transaction (`BEGIN IMMEDIATE`, the database's write
    lock): load the rows other processes committed since this process last
    looked, apply the rule against the full memory, insert, commit. Two
    processes sharing a file therefore see each other's certificates in id
    order and can never store overlapping balls of different classes.
  * WAL journal with `synchronous=FULL`: the WAL is fsynced at every commit, so
    a certificate `insert` returned survives a killed process, and also a
    power loss or OS crash. (`NORMAL` is crash-consistent in WAL mode but can
    lose the last commits on power loss; an issued certificate that vanished
    could then be contradicted by a later one.) The price is one fsync per
    transaction, which `insert_many` amortises over a batch.
  * The RAM index only ever holds committed rows: after a failed commit it is
    cut back, and rows are (re)loaded from disk by id.

Network filesystems (pods put the workdir on NFS or a gcsfuse mount): SQLite's
WAL needs shared memory between the processes of one machine and does not
work over a network filesystem, so the store looks at the filesystem of its
file (`filesystem_type`, from /proc/self/mounts):
  * local: WAL, as above; several processes of one machine share the file;
  * a network filesystem with POSIX locks (NFS, CIFS, Lustre, ...): refused
    unless `network="exclusive"` (config `memory.network = "exclusive"`),
    which uses a rollback journal and holds the database's lock for the
    whole session (`locking_mode=EXCLUSIVE`): one process at a time, on one
    machine; sharing one store between machines over NFS is not supported;
  * a mount without POSIX locks (gcsfuse, s3fs, ...): always refused.
The launchers' default store path is on a local disk of process 0 when the
results directory is on a network filesystem (`default_path`).

No pickle: inputs are raw little-endian bytes of the declared dtype, C order;
metadata is JSON text.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import sqlite3
import threading
from typing import NamedTuple, Optional, Sequence

import numpy as np

from dds_jax import validate
from dds_jax.errors import DdsError, InputError
from dds_jax.memory import rule as rule_lib

SCHEMA_VERSION = 1
MEMORY_FILE = "memory.sqlite"
NETWORK_POLICIES = ("refuse", "exclusive")
# Filesystem types (as in /proc/self/mounts) over a network, with POSIX locks
# (NFS's lock manager and the like) or without them (object-store mounts).
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "lustre", "gpfs",
              "beegfs", "ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs",
              "fuse.cephfs", "afs", "ocfs2")
NO_LOCKS_FS = ("fuse.gcsfuse", "gcsfuse", "fuse.s3fs", "fuse.goofys",
               "fuse.rclone", "fuse.mountpoint-s3", "fuse.blobfuse",
               "fuse.blobfuse2")
MOUNTS = "/proc/self/mounts"
_BUSY_TIMEOUT_S = 60.0
_IDENTITY = ("input_shape", "dtype", "dataset", "model_fingerprint", "norm",
             "alpha")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
  id INTEGER PRIMARY KEY,        -- query order: 1, 2, ...
  x BLOB NOT NULL,               -- raw input bytes, declared dtype, C order
  pred INTEGER NOT NULL,         -- issued class (-1 = abstain)
  radius REAL NOT NULL,          -- issued radius
  raw_pred INTEGER NOT NULL,     -- class before the memory rule
  raw_radius REAL NOT NULL,      -- radius before the memory rule
  changed INTEGER NOT NULL,      -- 1 where the rule changed pred or radius
  example_id INTEGER,            -- caller's id (the noise key), nullable
  created_at TEXT NOT NULL       -- UTC, ISO 8601
);
"""


class MemoryStoreError(DdsError):
  """A memory store that cannot be opened or written."""


class MemoryMismatchError(MemoryStoreError):
  """A memory store made for another dataset, model, input shape, ..."""


class InsertResult(NamedTuple):
  pred: int
  radius: float
  changed: bool
  id: int


class BatchInsertResult(NamedTuple):
  preds: np.ndarray
  radii: np.ndarray
  changed: np.ndarray
  ids: np.ndarray


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="microseconds")


def _meta_value(name, value):
  if name == "input_shape":
    return list(value)
  return value


def filesystem_type(path, mounts: Optional[str] = None) -> str:
  """The filesystem type of the mount holding `path` ('' if unknown).

  Args:
    path: a file or directory (it need not exist yet: its nearest existing
      parent is looked up).
    mounts: the text of a mounts table (default: read `MOUNTS`).
  """
  if mounts is None:
    try:
      with open(MOUNTS, encoding="utf-8") as f:
        mounts = f.read()
    except OSError:
      return ""
  p = os.path.abspath(os.fspath(path))
  while not os.path.exists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  p = os.path.realpath(p)
  best, fstype = -1, ""
  for line in mounts.splitlines():
    parts = line.split()
    if len(parts) < 3:
      continue
    point = parts[1].replace("\\040", " ")
    inside = p == point or p.startswith(point.rstrip("/") + "/")
    if inside and len(point) > best:
      best, fstype = len(point), parts[2]
  return fstype


def is_network(fstype: str) -> bool:
  return fstype in NETWORK_FS or fstype in NO_LOCKS_FS


def default_path(results_dir, mounts: Optional[str] = None,
                 local_dir: Optional[str] = None) -> str:
  """Where a run's store goes by default: `<results_dir>/memory.sqlite`, or,
  when results_dir is on a network filesystem, a file on this machine's
  disk keyed by the results directory (`$DDS_JAX_CACHE/memory/` or
  `~/.cache/dds_jax/memory/`)."""
  if not is_network(filesystem_type(results_dir, mounts)):
    return os.path.join(os.fspath(results_dir), MEMORY_FILE)
  import hashlib  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256(os.path.abspath(os.fspath(results_dir)).encode()
                       ).hexdigest()[:16]
  base = local_dir or os.path.join(
      os.environ.get("DDS_JAX_CACHE") or os.path.join(
          os.path.expanduser("~"), ".cache", "dds_jax"), "memory")
  os.makedirs(base, exist_ok=True)
  return os.path.join(base, f"{key}-{MEMORY_FILE}")


class MemoryStore:
  """A memory of certificates persisted in an SQLite file.

  Use `MemoryStore.open(path, ...)` (or the constructor) as a context manager::

    with MemoryStore.open("mem.sqlite", input_shape=(32, 32, 3),
                          dataset="cifar10", model_fingerprint=fp) as store:
      pred, radius, changed, qid = store.insert(x, raw_pred, raw_radius)

  Not for use from several threads at once (each process or thread should
  open its own store; they share the file safely).
  """

  def __init__(self, path, *, input_shape: Sequence[int],
               dtype: str = "float32", dataset: str, model_fingerprint: str,
               norm: int = 2, alpha: Optional[float] = None,
               create: bool = True, timeout: float = _BUSY_TIMEOUT_S,
               network: str = "refuse", mounts: Optional[str] = None):
    """Opens (or creates) the store at path.

    Args:
      path: the SQLite file.
      input_shape: shape of one input, e.g. (32, 32, 3).
      dtype: 'float32' or 'float64', how inputs are stored.
      dataset: name of the data the inputs come from.
      model_fingerprint: identifies the model (architecture + weights).
      norm: 2 (L2, gaussian noise) or 1 (L1, uniform noise).
      alpha: failure probability of each certificate, if known (for the
        union bound of `summary`); when given it must match the stored one.
      create: create the file when it does not exist.
      timeout: seconds to wait for another process's write lock.
      network: on a network filesystem with POSIX locks, 'refuse' (default)
        or 'exclusive' (rollback journal, the lock held for the session:
        one process at a time). A mount without POSIX locks is refused
        either way.
      mounts: a mounts table to detect the filesystem with (tests; default
        /proc/self/mounts).

    Raises:
      MemoryMismatchError: the file holds a store with other parameters.
      MemoryStoreError: the file is not a store, is from a newer version, or
        does not exist and create is False.
      InputError: invalid arguments.
    """
    self.path = os.fspath(path)
    self.input_shape = tuple(int(s) for s in input_shape)
    if str(dtype) not in ("float32", "float64"):
      raise InputError(f"dtype must be 'float32' or 'float64'; got {dtype!r}")
    self.dtype = str(dtype)
    for name, v in (("dataset", dataset),
                    ("model_fingerprint", model_fingerprint)):
      if not isinstance(v, str) or not v:
        raise InputError(f"{name} must be a non-empty string; got {v!r}")
    self.dataset = dataset
    self.model_fingerprint = model_fingerprint
    self.norm = rule_lib.check_norm(norm)
    self.alpha = (None if alpha is None else
                  validate.check_alpha(alpha, "alpha (when given)"))
    self._index = rule_lib.MemoryIndex(self.input_shape, self.dtype, self.norm)
    if network not in NETWORK_POLICIES:
      raise InputError(f"network must be one of {NETWORK_POLICIES}; got "
                       f"{network!r}")
    self.filesystem = ("" if self.path == ":memory:" else
                       filesystem_type(self.path, mounts))
    self.exclusive = False
    if self.filesystem in NO_LOCKS_FS:
      raise MemoryStoreError(
          f"{self.path} is on a {self.filesystem} mount, which has no POSIX "
          "locks: SQLite cannot keep the memory consistent there. Put the "
          "store on a local disk of process 0 (memory.path).")
    if self.filesystem in NETWORK_FS:
      if network == "refuse":
        raise MemoryStoreError(
            f"{self.path} is on a network filesystem ({self.filesystem}), "
            "where SQLite's WAL mode does not work. Put the store on a local "
            "disk of process 0 (memory.path), or set memory.network="
            "'exclusive' (MemoryStore(network='exclusive')) for a rollback "
            "journal with the lock held by one process at a time (one "
            "machine; sharing a store between machines is not supported).")
      self.exclusive = True
    self._lock = threading.RLock()
    self._conn = None
    self.created_at = None
    if not create and not os.path.exists(self.path):
      raise MemoryStoreError(f"no memory store at {self.path} (create=False)")
    try:
      if create:
        self._conn = sqlite3.connect(self.path, timeout=timeout,
                                     isolation_level=None)
      else:
        uri = pathlib.Path(self.path).absolute().as_uri() + "?mode=rw"
        self._conn = sqlite3.connect(uri, uri=True, timeout=timeout,
                                     isolation_level=None)
      self._open(create)
    except sqlite3.DatabaseError as e:
      self._close_conn()
      raise MemoryStoreError(f"cannot open memory store {self.path}: "
                             f"{type(e).__name__}: {e}") from e
    except BaseException:
      self._close_conn()
      raise

  @classmethod
  def open(cls, path, **kwargs) -> "MemoryStore":
    """Same as the constructor."""
    return cls(path, **kwargs)

  # -- opening -----------------------------------------------------------------

  def _requested(self) -> dict:
    return dict(input_shape=list(self.input_shape), dtype=self.dtype,
                dataset=self.dataset,
                model_fingerprint=self.model_fingerprint, norm=self.norm,
                alpha=self.alpha)

  def _read_meta(self) -> Optional[dict]:
    tables = {r[0] for r in self._conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" not in tables:
      if tables:
        raise MemoryStoreError(
            f"{self.path} is an SQLite database but not a dds_jax memory store "
            f"(tables: {sorted(tables)}); use another path")
      return None
    return {k: json.loads(v) for k, v in
            self._conn.execute("SELECT key, value FROM meta")}

  def _check_meta(self, meta: dict) -> None:
    version = meta.get("schema_version")
    if not isinstance(version, int):
      raise MemoryStoreError(f"{self.path}: not a dds_jax memory store (no "
                             "schema_version)")
    if version > SCHEMA_VERSION:
      raise MemoryStoreError(
          f"{self.path} was written by a newer dds_jax (memory schema version "
          f"{version}; this one reads {SCHEMA_VERSION}); upgrade dds_jax")
    requested = self._requested()
    diffs = []
    for name in _IDENTITY:
      stored, want = meta.get(name), requested[name]
      if name == "alpha" and want is None:
        continue
      if stored != want:
        if name == "input_shape":
          stored, want = tuple(stored), tuple(want)
        diffs.append(f"  {name}: stored {stored!r}, requested {want!r}")
    if diffs:
      raise MemoryMismatchError(
          f"the memory store {self.path} was made for other inputs or another "
          "model:\n" + "\n".join(diffs) + "\nA memory only holds for the model "
          "and data it was built with: use another path for this one.")
    self.alpha = meta.get("alpha")
    self.created_at = meta.get("created_at")

  def _open(self, create: bool) -> None:
    meta = self._read_meta()
    if meta is None and not create:
      raise MemoryStoreError(f"{self.path} is empty, not a memory store "
                             "(create=False)")
    if self.exclusive:  # network filesystem: no WAL, one process at a time
      self._conn.execute("PRAGMA locking_mode=EXCLUSIVE")
      mode = self._conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
      if mode.lower() != "delete":
        raise MemoryStoreError(
            f"{self.path}: cannot switch SQLite to a rollback journal on "
            f"this network filesystem (journal mode {mode!r})")
    elif meta is None:
      mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
      if mode.lower() != "wal" and self.path != ":memory:":
        raise MemoryStoreError(f"{self.path}: cannot use SQLite WAL mode "
                               f"(got {mode!r}); use a local file system")
    if meta is None:
      self._conn.execute("BEGIN IMMEDIATE")
      try:
        meta = self._read_meta()
        if meta is None:   # nobody created it meanwhile
          for statement in _SCHEMA.split(";"):
            if statement.strip():
              self._conn.execute(statement)
          values = dict(self._requested(), schema_version=SCHEMA_VERSION,
                        created_at=_now(), clearance=rule_lib.CLEARANCE)
          self._conn.executemany(
              "INSERT INTO meta (key, value) VALUES (?, ?)",
              [(k, json.dumps(v)) for k, v in values.items()])
          meta = values
        self._conn.execute("COMMIT")
      except BaseException:
        self._rollback()
        raise
    self._check_meta(meta)
    self._conn.execute("PRAGMA synchronous=FULL")
    with self._lock:
      self._refresh()

  def _close_conn(self) -> None:
    if self._conn is not None:
      self._conn.close()
      self._conn = None

  def close(self) -> None:
    """Closes the file; the store cannot be used afterwards."""
    with self._lock:
      self._close_conn()

  def __enter__(self) -> "MemoryStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self._close_conn()
    except Exception:  # pylint: disable=broad-except
      pass

  def _db(self) -> sqlite3.Connection:
    if self._conn is None:
      raise MemoryStoreError(f"the memory store {self.path} is closed")
    return self._conn

  def _rollback(self) -> None:
    try:
      if self._conn is not None and self._conn.in_transaction:
        self._conn.execute("ROLLBACK")
    except sqlite3.Error:
      pass

  # -- reading -----------------------------------------------------------------

  def _refresh(self) -> int:
    """Loads rows committed by anyone since the last look; returns how many."""
    db = self._db()
    n = len(self._index)
    total = db.execute("SELECT COUNT(*), MAX(id) FROM certificates "
                       "WHERE id > ?", (n,)).fetchone()
    if not total[0]:
      return 0
    if total[1] != n + total[0]:
      raise MemoryStoreError(f"{self.path}: certificate ids are not "
                             f"contiguous after id {n}; the file is damaged")
    self._index.reserve(n + total[0])
    itemsize = np.dtype(self.dtype).itemsize * self._index.dim
    cur = db.execute("SELECT id, x, pred, radius FROM certificates "
                     "WHERE id > ? ORDER BY id", (n,))
    while True:
      rows = cur.fetchmany(2048)
      if not rows:
        break
      ids = [r[0] for r in rows]
      if ids != list(range(len(self._index) + 1,
                           len(self._index) + 1 + len(rows))):
        raise MemoryStoreError(f"{self.path}: certificate ids are not "
                               "contiguous; the file is damaged")
      if any(len(r[1]) != itemsize for r in rows):
        raise MemoryStoreError(f"{self.path}: a stored input has the wrong "
                               "size; the file is damaged")
      xs = np.frombuffer(b"".join(r[1] for r in rows), self.dtype).reshape(
          (len(rows),) + self.input_shape)
      self._index.add(xs, np.array([r[2] for r in rows], np.int64),
                      np.array([r[3] for r in rows], np.float64))
    return total[0]

  def refresh(self) -> int:
    """Loads certificates other processes committed; returns how many."""
    with self._lock:
      return self._refresh()

  def __len__(self) -> int:
    """k, the number of stored certificates (after a refresh)."""
    with self._lock:
      self._refresh()
      return len(self._index)

  @property
  def next_id(self) -> int:
    """The id the next certificate will get, unless another process wins."""
    return len(self) + 1

  def stored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(xs [k, *input_shape], preds [k], radii [k], ids [k]) in query order."""
    with self._lock:
      self._refresh()
      n = len(self._index)
      return (np.array(self._index.xs), self._index.preds, self._index.radii,
              np.arange(1, n + 1, dtype=np.int64))

  def records(self) -> dict[str, np.ndarray]:
    """Every column of the file, read from disk, in id order."""
    with self._lock:
      rows = self._db().execute(
          "SELECT id, x, pred, radius, raw_pred, raw_radius, changed, "
          "example_id, created_at FROM certificates ORDER BY id").fetchall()
    k = len(rows)
    return dict(
        id=np.array([r[0] for r in rows], np.int64),
        x=np.frombuffer(b"".join(r[1] for r in rows), self.dtype).reshape(
            (k,) + self.input_shape).copy(),
        pred=np.array([r[2] for r in rows], np.int64),
        radius=np.array([r[3] for r in rows], np.float64),
        raw_pred=np.array([r[4] for r in rows], np.int64),
        raw_radius=np.array([r[5] for r in rows], np.float64),
        changed=np.array([bool(r[6]) for r in rows], bool),
        example_id=np.array([r[7] for r in rows], object),
        created_at=np.array([r[8] for r in rows], object))

  def lookup(self, x) -> Optional[tuple[int, float]]:
    """The serving shortcut (not the canonical rule): no sampling, no storing.

    If x lies inside stored balls (d(x, x_j) < R_j), returns the deepest one's
    class with radius R_j - d(x, x_j) (max over containing balls), else None.
    Ball j certifies every point of B(x_j, R_j), so this answer holds with
    the probability ball j holds: nothing new is issued, the memory does not
    grow and the union bound does not change. Against the canonical rule
    (certify x, then `insert`): same class (every ball containing x has one
    class, and the rule overrules to it); same radius when sampling would have
    disagreed with the ball (the rule's overrule radius is R_j* - d, up to the
    ~1e-9 clearance); a radius that can be smaller when sampling would have
    agreed (the rule keeps x's own, possibly larger, radius). And since x is
    not stored, later queries are not shaped by it: answers depend on whether
    earlier queries were served or inserted.

    Args:
      x: one input of the store's shape.

    Returns:
      (pred, radius) or None.
    """
    with self._lock:
      self._refresh()
      return self._index.lookup(x)

  def rule(self, x, pred: int, radius: float) -> tuple[int, float]:
    """What `insert` would issue now, without storing (a dry run)."""
    with self._lock:
      self._refresh()
      return self._index.rule(x, pred, radius)

  # -- writing -----------------------------------------------------------------

  def insert(self, x, pred: int, radius: float,
             example_id: Optional[int] = None) -> InsertResult:
    """Applies the rule to a certified input and stores it, atomically.

    Args:
      x: the input, of the store's shape (cast to its dtype).
      pred: its certified class (-1 = abstain).
      radius: its certified radius (0 where abstaining).
      example_id: optional integer to keep with it (e.g. the noise key).

    Returns:
      InsertResult(pred, radius, changed, id): the certificate to issue and
      its id (query order). It is committed when this returns.

    Raises:
      InputError: bad x, pred or radius.
    """
    r = self.insert_many(np.asarray(x)[None], [pred], [radius],
                         None if example_id is None else [example_id])
    return InsertResult(int(r.preds[0]), float(r.radii[0]),
                        bool(r.changed[0]), int(r.ids[0]))

  def insert_many(self, xs, preds, radii, example_ids=None,
                  chunk_size: int = 1000) -> BatchInsertResult:
    """Inserts certificates in order; the results equal one at a time.

    Each chunk of `chunk_size` certificates is one transaction (all or none of
    it is committed); a chunk is reported only after its commit.

    Args:
      xs: [B, *input_shape] inputs.
      preds: [B] certified classes.
      radii: [B] certified radii.
      example_ids: None or [B] integers (None entries allowed).
      chunk_size: certificates per transaction.

    Returns:
      BatchInsertResult(preds, radii, changed, ids), arrays [B].
    """
    xs, preds, radii = rule_lib.check_certificates(
        xs, preds, radii, self.input_shape, self.dtype)
    b = len(xs)
    if example_ids is None:
      example_ids = [None] * b
    example_ids = list(example_ids)
    if len(example_ids) != b or not all(
        e is None or (isinstance(e, (int, np.integer)) and
                      not isinstance(e, bool)) for e in example_ids):
      raise InputError(f"example_ids must be {b} integers or None")
    chunk_size = validate.check_count(chunk_size, "chunk_size")
    out = [np.empty(b, np.int64), np.empty(b), np.empty(b, bool),
           np.empty(b, np.int64)]
    with self._lock:
      for s in range(0, b, chunk_size):
        e = min(b, s + chunk_size)
        res = self._insert_chunk(xs[s:e], preds[s:e], radii[s:e],
                                 example_ids[s:e])
        for o, v in zip(out, res):
          o[s:e] = v
    return BatchInsertResult(*out)

  def _insert_chunk(self, xs, preds, radii, example_ids):
    db = self._db()
    db.execute("BEGIN IMMEDIATE")
    n_before = None
    try:
      self._refresh()
      n_before = len(self._index)
      c, r, ch = self._index.insert_many(xs, preds, radii)
      ids = np.arange(n_before + 1, n_before + 1 + len(xs), dtype=np.int64)
      now = _now()
      db.executemany(
          "INSERT INTO certificates (id, x, pred, radius, raw_pred, "
          "raw_radius, changed, example_id, created_at) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
          [(int(ids[i]), np.ascontiguousarray(xs[i]).tobytes(), int(c[i]),
            float(r[i]), int(preds[i]), float(radii[i]), int(ch[i]),
            None if example_ids[i] is None else int(example_ids[i]), now)
           for i in range(len(xs))])
      db.execute("COMMIT")
    except BaseException as e:
      self._rollback()
      if n_before is not None:
        self._index.truncate(min(n_before, len(self._index)))
      if isinstance(e, sqlite3.Error):
        raise MemoryStoreError(f"cannot write to the memory store "
                               f"{self.path}: {type(e).__name__}: {e}") from e
      raise
    return c, r, ch, ids

  # -- summaries ---------------------------------------------------------------

  def summary(self, alpha: Optional[float] = None) -> dict:
    """num_stored k, union_bound min(1, k * alpha), num_changed, ...

    Args:
      alpha: failure probability of each certificate (default: the store's).

    Returns:
      A dict; union_bound is None when no alpha is known.
    """
    alpha = self.alpha if alpha is None else validate.check_alpha(alpha)
    with self._lock:
      self._refresh()
      k = len(self._index)
      preds = self._index.preds
      num_changed = self._db().execute(
          "SELECT COUNT(*) FROM certificates WHERE changed != 0").fetchone()[0]
    return dict(
        path=self.path, filesystem=self.filesystem,
        exclusive=self.exclusive, num_stored=k, num_changed=int(num_changed),
        num_abstained=int(np.sum(preds == rule_lib.ABSTAIN)), alpha=alpha,
        union_bound=None if alpha is None else min(1.0, k * alpha),
        dataset=self.dataset, model_fingerprint=self.model_fingerprint,
        input_shape=self.input_shape, dtype=self.dtype, norm=self.norm,
        created_at=self.created_at)

  def check_invariant(self, raise_error: bool = False, since: int = 0) -> bool:
    """True when no two stored balls of different classes intersect.

    Uses the rule's own float64 distance and test (`rule.exact_distances`,
    `rule.overlaps`). O(k^2) projected dot products for every pair: seconds
    for 10k entries, minutes for 100k.

    Args:
      raise_error: raise `rule.MemoryInvariantError` on a violation instead
        of returning False.
      since: a number of certificates (ids 1 .. since) taken as already
        checked among themselves, e.g. `len(store)` before a run: only pairs
        with a certificate of id > since are examined (each against all
        others), O((k - since) k). 0 (the default) checks every pair.

    Raises:
      InputError: since is not an integer in [0, k].
    """
    with self._lock:
      self._refresh()
      return self._index.check_invariant(raise_error, since=since)
