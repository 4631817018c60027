"""The memory rule of data-dependent smoothing (see docs/method.md, "The memory"), in RAM.

With sigma chosen per input, Cohen's radius at x says nothing about the
prediction at x + delta. A memory M of issued certificates (x_j, c_j, R_j) is
kept and every new certified input (x, c, R) is processed in query order::

    D = { j in M : d(x, x_j) < R + R_j and c_j != c }      (open balls)
    if D is not empty:
      j* = argmin_{j in D} (d(x, x_j) - R_j);  m = that minimum
      if m < 0: c = c_j*          # x lies inside a different-class ball
      R = |m|                     # shrink to touch it / fit inside it
    append (x, c, R) to M

Invariant: no two stored balls of different classes intersect, as tested by
`overlaps(exact_distances(x_i, x_j), R_i, R_j)`, i.e. `d < R_i + R_j` with d
from `exact_distances` (float64) and the sum in float64.

Floating point. `exact_distances` is the one distance function of the rule and
of every invariant check; its value for a pair of rows does not depend on which
other rows are in the call. After the rule, the new radius is lowered to the
largest float64 (found with np.nextafter towards 0) that keeps a relative
clearance of `CLEARANCE` (2**-30) from every ball of another class:
`(R + R_j) * (1 + CLEARANCE) <= d`. That is at most ~1e-9 relative below the
rule's radius and implies the plain test `d >= R + R_j`. Why the clearance:
float distances are not exactly a metric, so two balls that touch exactly in
float64 could both appear to contain a point next to their contact point;
such a point could then take no class without breaking the invariant. With the
clearance, float errors in three distances (~1e-14 relative) can never close
the gap (a positive radius that cannot keep it becomes 0; a radius-0 entry is a
point and contains nothing).

Candidate search. Per query, a guaranteed lower bound on d(x, x_j) for every
stored row comes from an orthonormal projection P (block sums over spatial
blocks of an [H, W, C] input, else over contiguous chunks of the flat input;
<= 256 dims): ||P(x - x_j)||_2 <= ||x - x_j||_2, and for L1
sqrt(smallest block) * ||P(x - x_j)||_2 <= ||x - x_j||_1. It is
computed as ||Px||^2 + ||Px_j||^2 - 2 Px.Px_j with the projections stored in
float32 (one matrix-vector product), minus a rigorous bound on the float32
rounding error (gamma_k ||Px|| max_j ||Px_j||). Rows whose bound does not rule
them out are refined, when there are many, by the same test on the full input
(matrix-vector product in the input dtype), and checked with `exact_distances`.
The result is identical to running the rule on all rows (`memory_rule`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from dds_jax import validate
from dds_jax.errors import DdsError, InputError

ABSTAIN = -1
# The norms of certified radii: 2 for gaussian noise, 1 for uniform
# (`validate.NORM_OF_NOISE`).
NORMS = tuple(sorted(set(validate.NORM_OF_NOISE.values())))
# Relative clearance kept between balls of different classes (see module doc).
CLEARANCE = 2.0 ** -30
_CLEAR = 1.0 + CLEARANCE
# Candidate thresholds get this relative slack on top of the clearance, which
# covers the float64 error of `exact_distances` (~1e-14 relative) many times.
_FILTER = _CLEAR * (1.0 + 1e-9)
# Above this many candidates the full-input Gram bound refines them.
REFINE_MIN = 512
_EXACT_CHUNK = 1024     # rows per block of the float64 distance computation
_QUERY_CHUNK = 64       # queries per matrix product in `insert_many`
_MAX_PROJ_DIMS = 256
_BLAS_MIN_ROWS = 20_000  # fewer stored rows: no BLAS for the pre-filter


class MemoryInvariantError(DdsError):
  """Stored certificates of different classes overlap (should never happen)."""


def check_norm(norm) -> int:
  if isinstance(norm, bool) or norm not in NORMS:
    raise InputError(f"norm must be 1 (L1) or 2 (L2); got {norm!r}")
  return int(norm)


def exact_distances(x, rows, norm: int = 2) -> np.ndarray:
  """float64 distances from x to each row: THE distance of the rule.

  Args:
    x: one input (any shape with the rows' number of elements).
    rows: [K, ...] stored inputs.
    norm: 2 (Euclidean) or 1 (L1).

  Returns:
    float64 [K]. Each entry depends only on x and its row (not on the other
    rows or on K), and d(a, b) == d(b, a) bitwise.
  """
  x64 = np.asarray(x).astype(np.float64).reshape(-1)
  rows = np.asarray(rows)
  rows = rows.reshape(rows.shape[0], x64.size)
  out = np.empty(rows.shape[0], np.float64)
  for s in range(0, rows.shape[0], _EXACT_CHUNK):
    diff = rows[s:s + _EXACT_CHUNK].astype(np.float64)
    diff -= x64
    if norm == 2:
      np.multiply(diff, diff, out=diff)
      out[s:s + _EXACT_CHUNK] = np.sqrt(np.sum(diff, axis=1))
    else:
      np.abs(diff, out=diff)
      out[s:s + _EXACT_CHUNK] = np.sum(diff, axis=1)
  return out


def overlaps(d, r, r_other) -> np.ndarray:
  """The overlap test of two open balls: d < r + r_other (float64)."""
  return np.asarray(d, np.float64) < (np.asarray(r, np.float64) +
                                      np.asarray(r_other, np.float64))


def _conflict_step(c: int, r: float, d: np.ndarray, mc: np.ndarray,
                   mr: np.ndarray) -> tuple[int, float]:
  """The paper's rule on rows with distances d (ties: the earliest row)."""
  conflict = (mc != c) & (d < r + mr)
  if not conflict.any():
    return c, r
  idx = np.flatnonzero(conflict)
  gaps = d[idx] - mr[idx]
  j = idx[int(np.argmin(gaps))]
  m = float(d[j] - mr[j])
  if m < 0:
    return int(mc[j]), -m
  return c, m


def _clearance_step(c: int, r: float, d: np.ndarray, mc: np.ndarray,
                    mr: np.ndarray) -> float:
  """The largest radius <= r that keeps the clearance from other classes."""
  other = mc != c
  d, mr = d[other], mr[other]

  def bad(rad: float) -> bool:
    if rad > 0:
      return bool(np.any(d < (rad + mr) * _CLEAR))
    return bool(np.any(d < mr))

  if r > 0 and bad(r):
    viol = d < (r + mr) * _CLEAR
    r = min(r, max(0.0, float(np.min(d[viol] / _CLEAR - mr[viol]))))
    steps = 0
    while r > 0 and bad(r):
      steps += 1
      r = float(np.nextafter(r, 0.0)) if steps < 64 else r * (1 - 2.0 ** -20)
      if r < np.finfo(np.float64).tiny:
        r = 0.0
  if r == 0 and bad(0.0):
    raise MemoryInvariantError(
        "internal error: a point lies inside two stored balls of different "
        "classes; the memory's invariant was broken before this insert")
  return r


def _resolve(c: int, r: float, d, mc, mr) -> tuple[int, float]:
  c1, r1 = _conflict_step(c, r, d, mc, mr)
  return c1, _clearance_step(c1, r1, d, mc, mr)


def check_certificate(x, pred, radius, input_shape: Sequence[int],
                      dtype) -> tuple[np.ndarray, int, float]:
  """Validates one certificate; returns (x as dtype, pred, radius)."""
  xs, ps, rs = check_certificates(np.asarray(x)[None], [pred], [radius],
                                  input_shape, dtype)
  return xs[0], int(ps[0]), float(rs[0])


def check_certificates(xs, preds, radii, input_shape: Sequence[int],
                       dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validates a batch of certificates.

  Args:
    xs: [B, *input_shape] finite inputs (cast to dtype; must stay finite).
    preds: [B] integers >= -1 (-1 = abstain).
    radii: [B] finite radii >= 0; 0 where pred is -1.
    input_shape: the shape of one input.
    dtype: the dtype inputs are stored in.

  Returns:
    (xs [B, *input_shape] dtype, preds int64 [B], radii float64 [B]).

  Raises:
    InputError: on anything else.
  """
  input_shape = tuple(input_shape)
  xs = np.asarray(xs)
  if xs.shape[1:] != input_shape:
    raise InputError(f"inputs must have shape {input_shape}; got "
                     f"{xs.shape[1:] if xs.ndim else xs.shape}")
  if not (np.issubdtype(xs.dtype, np.floating) or
          np.issubdtype(xs.dtype, np.integer)):
    raise InputError(f"inputs must be real numbers; got dtype {xs.dtype}")
  with np.errstate(over="ignore"):
    xs = xs.astype(dtype, copy=False)
  if not np.all(np.isfinite(xs)):
    raise InputError(f"inputs must be finite (as {np.dtype(dtype).name}); "
                     "got NaN or infinity")
  b = xs.shape[0]
  preds = np.asarray(preds)
  radii = np.asarray(radii)
  if preds.shape != (b,) or radii.shape != (b,):
    raise InputError(f"need one pred and one radius per input ({b}); got "
                     f"shapes {preds.shape} and {radii.shape}")
  if b and (preds.dtype == bool or not np.issubdtype(preds.dtype, np.integer)):
    raise InputError(f"pred must be an integer class (or -1 to abstain); got "
                     f"dtype {preds.dtype}")
  if b and (radii.dtype == bool or not (np.issubdtype(radii.dtype, np.floating)
                                        or np.issubdtype(radii.dtype,
                                                         np.integer))):
    raise InputError(f"radius must be a real number; got dtype {radii.dtype}")
  preds = preds.astype(np.int64)
  radii = radii.astype(np.float64)
  if np.any(preds < ABSTAIN):
    raise InputError(f"pred must be >= -1; got {preds[preds < ABSTAIN][:5]}")
  if not np.all(np.isfinite(radii)) or np.any(radii < 0):
    raise InputError("radius must be finite and >= 0; got "
                     f"{radii[~(np.isfinite(radii) & (radii >= 0))][:5]}")
  if np.any((preds == ABSTAIN) & (radii != 0)):
    raise InputError("an abstention (pred -1) must have radius 0")
  return xs, preds, radii


def memory_rule(x, c: int, r: float, mem_x, mem_c, mem_r,
                norm: int = 2) -> tuple[int, float]:
  """One step of the rule against a memory, without any pre-filter.

  Args:
    x: the new input.
    c: its certified class (-1 to abstain).
    r: its certified radius.
    mem_x: [K, ...] stored inputs, in query order.
    mem_c: [K] stored classes.
    mem_r: [K] stored radii.
    norm: 2 or 1.

  Returns:
    (class, radius) to issue and store for x. `MemoryIndex` gives the same
    answer with a pre-filter.
  """
  norm = check_norm(norm)
  mem_c = np.asarray(mem_c, np.int64)
  mem_r = np.asarray(mem_r, np.float64)
  if len(mem_c) == 0:
    return int(c), float(r)
  d = exact_distances(x, mem_x, norm)
  return _resolve(int(c), float(r), d, mem_c, mem_r)


class _Projection:
  """An orthonormal projection to <= 256 dims: normalized block sums."""

  def __init__(self, input_shape: tuple[int, ...]):
    self.shape = input_shape
    self.dim = int(np.prod(input_shape))
    if len(input_shape) == 3 and input_shape[2] <= 64:
      h, w, ch = input_shape
      side = max(1, min(8, int(math.sqrt(_MAX_PROJ_DIMS / ch))))
      self._starts = [self._bounds(h, side), self._bounds(w, side)]
      counts = np.outer(*[np.diff(np.append(s, n)) for s, n in
                          zip(self._starts, (h, w))])
      self._scale = 1.0 / np.sqrt(np.repeat(counts[..., None], ch, axis=2))
      self.min_block = int(counts.min())
      self._spatial = True
    else:
      self._starts = [self._bounds(self.dim, _MAX_PROJ_DIMS)]
      counts = np.diff(np.append(self._starts[0], self.dim))
      self._scale = 1.0 / np.sqrt(counts.astype(np.float64))
      self.min_block = int(counts.min())
      self._spatial = False
    self.k = int(self._scale.size)
    self._scale = self._scale.reshape(-1)

  @staticmethod
  def _bounds(n: int, parts: int) -> np.ndarray:
    return np.unique(np.linspace(0, n, min(n, parts) + 1).astype(np.int64)[:-1])

  def __call__(self, xs: np.ndarray) -> np.ndarray:
    """[B, dim] -> [B, k] float64."""
    b = xs.shape[0]
    x64 = xs.astype(np.float64, copy=False)
    if self._spatial:
      h, w, ch = self.shape
      x64 = np.add.reduceat(x64.reshape(b, h, w * ch), self._starts[0], axis=1)
      x64 = np.add.reduceat(x64.reshape(b, -1, w, ch), self._starts[1], axis=2)
    else:
      x64 = np.add.reduceat(x64.reshape(b, self.dim), self._starts[0], axis=1)
    return x64.reshape(b, self.k) * self._scale


def _dots(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """[Q, n] float32 dot products of queries [Q, k] with rows [n, k].

  Small products use numpy's single-threaded loop: a multi-threaded BLAS call
  can wait milliseconds for its threads on a busy machine.
  """
  if len(queries) == 1:
    return np.einsum("ij,j->i", rows, queries[0])[None]
  if len(rows) < _BLAS_MIN_ROWS:
    return np.stack([np.einsum("ij,j->i", rows, q) for q in queries])
  return queries @ rows.T


class _Query:
  """One query's input, projection and norms."""

  def __init__(self, x, p32, pnorm, xnorm):
    self.x = x              # [dim] in the index dtype
    self.p32 = p32          # [k] float32 projection
    self.pnorm = pnorm      # ||p32|| in float64
    self.xnorm = xnorm      # ||x|| in float64


class MemoryIndex:
  """The memory in RAM: stored inputs, classes, radii; the rule with a filter.

  Inputs are held as one growing [capacity, dim] array (amortised doubling)
  with cached float64 norms and float32 projections. Not thread-safe.
  """

  def __init__(self, input_shape: Sequence[int], dtype="float32",
               norm: int = 2):
    self.input_shape = tuple(int(s) for s in input_shape)
    if not self.input_shape or any(s < 1 for s in self.input_shape):
      raise InputError(f"input_shape must be positive ints; got {input_shape}")
    self.dtype = np.dtype(dtype)
    if self.dtype not in (np.float32, np.float64):
      raise InputError(f"dtype must be float32 or float64; got {dtype}")
    self.norm = check_norm(norm)
    self._proj = _Projection(self.input_shape)
    self.dim = self._proj.dim
    u = np.finfo(np.float32).eps / 2
    k = self._proj.k
    self._gamma_proj = k * u / (1 - k * u)
    self._u32 = u
    ud = np.finfo(self.dtype).eps / 2
    self._gamma_full = (self.dim * ud / (1 - self.dim * ud)
                        if self.dim * ud < 0.01 else None)
    self._tol64 = 4 * (self.dim + k + 16) * np.finfo(np.float64).eps
    # sqrt of the smallest block, rounded down: ||v||_1 >= this * ||Pv||_2.
    self._l1_factor = float(np.nextafter(math.sqrt(self._proj.min_block), 0))
    self._n = 0
    self._cap = 0
    self._x = np.empty((0, self.dim), self.dtype)
    self._p = np.empty((0, k), np.float32)
    self._pn2 = np.empty(0)       # ||p32||^2, float64
    self._xn = np.empty(0)        # ||x||, float64
    self._c = np.empty(0, np.int64)
    self._r = np.empty(0)
    self._rf = np.empty(0)        # r * _FILTER
    self._pmax = 0.0
    self._xmax = 0.0
    self.exact_checks = 0         # rows whose exact distance was computed

  # -- storage ---------------------------------------------------------------

  def __len__(self) -> int:
    return self._n

  @property
  def xs(self) -> np.ndarray:
    """[k, *input_shape] stored inputs (a read-only view)."""
    v = self._x[:self._n].reshape((self._n,) + self.input_shape)
    v.flags.writeable = False
    return v

  @property
  def preds(self) -> np.ndarray:
    return self._c[:self._n].copy()

  @property
  def radii(self) -> np.ndarray:
    return self._r[:self._n].copy()

  def reserve(self, n: int) -> None:
    """Makes room for n entries in total."""
    if n <= self._cap:
      return
    cap = max(n, 2 * self._cap, 16)
    def grow(a, shape_tail=()):
      b = np.empty((cap,) + shape_tail, a.dtype)
      b[:self._n] = a[:self._n]
      return b
    self._x = grow(self._x, (self.dim,))
    self._p = grow(self._p, (self._proj.k,))
    self._pn2, self._xn = grow(self._pn2), grow(self._xn)
    self._c, self._r, self._rf = grow(self._c), grow(self._r), grow(self._rf)
    self._cap = cap

  def truncate(self, n: int) -> None:
    """Forgets every entry after the first n."""
    if not 0 <= n <= self._n:
      raise InputError(f"cannot truncate {self._n} entries to {n}")
    self._n = n
    self._pmax = float(np.sqrt(self._pn2[:n].max())) if n else 0.0
    self._xmax = float(self._xn[:n].max()) if n else 0.0

  def _prepare(self, xs: np.ndarray):
    """(flat [B, dim], p32 [B, k] float32, ||p32|| [B], ||x|| [B])."""
    flat = xs.reshape(xs.shape[0], self.dim)
    x64 = flat.astype(np.float64)
    p32 = self._proj(x64).astype(np.float32)
    p64 = p32.astype(np.float64)
    pn = np.sqrt(np.einsum("ij,ij->i", p64, p64))
    xn = np.sqrt(np.einsum("ij,ij->i", x64, x64))
    return flat, p32, pn, xn

  def _queries(self, xs: np.ndarray) -> list[_Query]:
    flat, p32, pn, xn = self._prepare(xs)
    return [_Query(flat[i], p32[i], pn[i], xn[i]) for i in range(len(flat))]

  def _append_rows(self, flat, p32, pn, xn, cs, rs) -> None:
    b = len(flat)
    self.reserve(self._n + b)
    i, j = self._n, self._n + b
    self._x[i:j], self._p[i:j] = flat, p32
    self._pn2[i:j], self._xn[i:j] = np.square(pn), xn
    self._c[i:j], self._r[i:j] = cs, rs
    self._rf[i:j] = np.asarray(rs, np.float64) * _FILTER
    if b:
      self._pmax = max(self._pmax, float(np.max(pn)))
      self._xmax = max(self._xmax, float(np.max(xn)))
    self._n = j

  def _append(self, q: _Query, c: int, r: float) -> None:
    self._append_rows(q.x[None], q.p32[None], np.array([q.pnorm]),
                      np.array([q.xnorm]), [c], [r])

  def add(self, xs, preds, radii) -> None:
    """Appends entries as they are, without the rule (e.g. read from disk)."""
    xs, preds, radii = check_certificates(xs, preds, radii, self.input_shape,
                                          self.dtype)
    self.reserve(self._n + len(xs))
    for s in range(0, len(xs), 4096):
      e = s + 4096
      self._append_rows(*self._prepare(xs[s:e]), preds[s:e], radii[s:e])

  # -- the rule ----------------------------------------------------------------

  def _filter_keys(self, q: _Query, dots: np.ndarray) -> np.ndarray:
    """Per row, a lower bound on d(q, row) minus row radius * _FILTER.

    A row can be within (R + R_j) * (1 + CLEARANCE) of q only where
    key < R * _FILTER.
    """
    n = len(dots)
    key = self._pn2[:n] + (q.pnorm ** 2)
    key -= 2.0 * dots.astype(np.float64)
    a, b = q.pnorm, self._pmax
    err = 2.5 * self._gamma_proj * a * b + self._tol64 * (a * a + b * b)
    key -= err
    np.maximum(key, 0.0, out=key)
    np.sqrt(key, out=key)
    key -= (1.01 * self._u32 + self._tol64) * (a + b)
    if self.norm == 1:  # ||v||_1 >= sum_g |sum_g v_i| >= sqrt(n_g) ||Pv||
      key *= self._l1_factor
    key -= self._rf[:n]
    return key

  def _refine(self, q: _Query, idx: np.ndarray, r: float) -> np.ndarray:
    """Drops rows of idx that the full-input Gram bound rules out."""
    if len(idx) == 0 or len(idx) < REFINE_MIN or self._gamma_full is None:
      return idx
    keep = []
    a = q.xnorm
    for s in range(0, len(idx), 4096):
      part = idx[s:s + 4096]
      dots = _dots(self._x[part], q.x[None])[0].astype(np.float64)
      b = self._xn[part]
      d2 = b * b + a * a - 2.0 * dots
      d2 -= 2.5 * self._gamma_full * a * b + self._tol64 * (a * a + b * b)
      lo = np.sqrt(np.maximum(d2, 0.0))
      keep.append(part[lo - self._rf[part] < r * _FILTER])
    return np.concatenate(keep)

  def _rule(self, q: _Query, dots: np.ndarray, c: int,
            r: float) -> tuple[int, float]:
    """The rule for q against the first len(dots) rows (dots: projections)."""
    n = len(dots)
    if n == 0:
      return c, r
    key = self._filter_keys(q, dots)
    cache = {}

    def dist(idx):
      new = [i for i in idx.tolist() if i not in cache]
      if new:
        self.exact_checks += len(new)
        new = np.asarray(new, np.int64)
        for i, v in zip(new.tolist(),
                        exact_distances(q.x, self._x[new], self.norm)):
          cache[i] = v
      return np.array([cache[i] for i in idx.tolist()], np.float64)

    idx = self._refine(q, np.flatnonzero(key < r * _FILTER), r)
    d = dist(idx)
    c1, r1 = _conflict_step(c, r, d, self._c[idx], self._r[idx])
    if r1 > r:   # overruled with a larger radius: more rows can matter
      idx = self._refine(q, np.flatnonzero(key < r1 * _FILTER), r1)
      d = dist(idx)
    return c1, _clearance_step(c1, r1, d, self._c[idx], self._r[idx])

  def insert_many(self, xs, preds, radii
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Applies the rule to each certificate in order and stores it.

    Later certificates see earlier ones, exactly as one at a time; only the
    pre-filter's matrix products are batched.

    Args:
      xs: [B, *input_shape] inputs.
      preds: [B] certified classes (-1 = abstain).
      radii: [B] certified radii (0 where abstaining).

    Returns:
      (preds int64 [B], radii float64 [B], changed bool [B]) as stored.
    """
    xs, preds, radii = check_certificates(xs, preds, radii, self.input_shape,
                                          self.dtype)
    b = len(xs)
    out_c, out_r = preds.copy(), radii.copy()
    n0 = self._n
    self.reserve(n0 + b)
    queries = self._queries(xs)
    p_all = np.stack([q.p32 for q in queries]) if b else None
    for s in range(0, b, _QUERY_CHUNK):
      e = min(b, s + _QUERY_CHUNK)
      old = _dots(self._p[:n0], p_all[s:e]) if n0 else None
      new = _dots(p_all[:e], p_all[s:e])
      for i in range(s, e):
        dots = new[i - s, :i] if n0 == 0 else np.concatenate(
            [old[i - s], new[i - s, :i]])
        c, r = self._rule(queries[i], dots, int(preds[i]), float(radii[i]))
        out_c[i], out_r[i] = c, r
        self._append(queries[i], c, r)
    return out_c, out_r, (out_c != preds) | (out_r != radii)

  def insert(self, x, pred: int, radius: float) -> tuple[int, float, bool]:
    """`insert_many` for one certificate: (pred, radius, changed)."""
    c, r, ch = self.insert_many(np.asarray(x)[None], [pred], [radius])
    return int(c[0]), float(r[0]), bool(ch[0])

  def rule(self, x, pred: int, radius: float) -> tuple[int, float]:
    """What the rule answers for a certificate now, without storing it."""
    x, pred, radius = check_certificate(x, pred, radius, self.input_shape,
                                        self.dtype)
    q = self._queries(x[None])[0]
    return self._rule(q, _dots(self._p[:self._n], q.p32[None])[0], pred,
                      radius)

  def lookup(self, x) -> Optional[tuple[int, float]]:
    """The serving shortcut: the deepest stored ball containing x, if any.

    Returns:
      (c_j, R_j - d(x, x_j)) for the stored ball j with d < R_j that
      maximises R_j - d (the earliest on ties), or None.
    """
    x, _, _ = check_certificate(x, 0, 0.0, self.input_shape, self.dtype)
    if self._n == 0:
      return None
    q = self._queries(x[None])[0]
    key = self._filter_keys(q, _dots(self._p[:self._n], q.p32[None])[0])
    idx = self._refine(q, np.flatnonzero(key < 0.0), 0.0)
    if len(idx) == 0:
      return None
    self.exact_checks += len(idx)
    depth = self._r[idx] - exact_distances(q.x, self._x[idx], self.norm)
    j = int(np.argmax(depth))
    if not depth[j] > 0:
      return None
    return int(self._c[idx[j]]), float(depth[j])

  def _check_since(self, since) -> int:
    if (isinstance(since, bool) or not isinstance(since, (int, np.integer))
        or not 0 <= since <= self._n):
      raise InputError(f"since must be an integer in [0, {self._n}] (a number "
                       f"of entries); got {since!r}")
    return int(since)

  def violations(self, limit: int = 10,
                 since: int = 0) -> list[tuple[int, int, float]]:
    """Pairs (j, i) (0-based, j < i) of different classes that overlap.

    Uses the filter and `exact_distances` with the later entry as the query,
    as the rule does. Only pairs with i >= since are examined, i.e. every pair
    that involves an entry after the first `since` (each against all the
    entries before it): O((k - since) k) projected dot products, O(k^2) for
    since = 0 (every pair).

    Args:
      limit: stop after this many pairs.
      since: entries 0 .. since - 1 are taken as already checked among
        themselves (e.g. the size of the memory before a run).

    Returns:
      Up to `limit` pairs (j, i, d(x_i, x_j)), by increasing i.
    """
    since = self._check_since(since)
    found = []
    for s in range(since, self._n, _QUERY_CHUNK):
      e = min(self._n, s + _QUERY_CHUNK)
      dots = _dots(self._p[:e], self._p[s:e])
      qs = [_Query(self._x[i], self._p[i], math.sqrt(self._pn2[i]),
                   self._xn[i]) for i in range(s, e)]
      for i in range(s, e):
        if i == 0:
          continue
        key = self._filter_keys(qs[i - s], dots[i - s, :i])
        idx = np.flatnonzero(key < self._r[i] * _FILTER)
        idx = idx[self._c[idx] != self._c[i]]
        if len(idx) == 0:
          continue
        d = exact_distances(self._x[i], self._x[idx], self.norm)
        for j, dj in zip(idx[overlaps(d, self._r[i], self._r[idx])], d[
            overlaps(d, self._r[i], self._r[idx])]):
          found.append((int(j), i, float(dj)))
          if len(found) >= limit:
            return found
    return found

  def check_invariant(self, raise_error: bool = False, since: int = 0) -> bool:
    """True when no two stored balls of different classes intersect.

    (With since > 0: no two among the pairs checked.)

    Args:
      raise_error: raise `MemoryInvariantError` on the first violation
        instead of returning False.
      since: check only the pairs that involve an entry after the first
        `since` (each against every entry before it), O((k - since) k); 0
        (the default) checks every pair, O(k^2).
    """
    bad = self.violations(limit=1, since=since)
    if bad and raise_error:
      j, i, d = bad[0]
      raise MemoryInvariantError(
          f"entries {j + 1} and {i + 1} have classes {self._c[j]} and "
          f"{self._c[i]}, radii {self._r[j]!r} and {self._r[i]!r} at distance "
          f"{d!r}: their balls intersect")
    return not bad


def apply_memory(xs, preds, radii, norm: int = 2
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The rule over a sequence of certificates in order, from an empty memory.

  Args:
    xs: [B, ...] inputs, float32 or float64 (kept as given; other types are
      cast to float64). The store keeps float32: pass float32 inputs to get
      the store's results.
    preds: [B] certified classes (-1 = abstain).
    radii: [B] certified radii (0 where abstaining).
    norm: 2 (L2, gaussian noise) or 1 (L1, uniform noise).

  Returns:
    (preds int64 [B], radii float64 [B], changed bool [B]): the certificates
    to issue; changed where pred or radius differs from the input.
  """
  xs = np.asarray(xs)
  if xs.ndim < 2:
    raise InputError(f"xs must be a batch [B, ...]; got shape {xs.shape}")
  dtype = xs.dtype if xs.dtype in (np.float32, np.float64) else np.float64
  index = MemoryIndex(xs.shape[1:], dtype, norm)
  return index.insert_many(xs, preds, radii)
