"""The memory rule, its SQLite store and the memory classifier."""

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dds_jax
from dds_jax import InputError
from dds_jax import memory
from dds_jax.memory import classifier as classifier_lib
from dds_jax.memory import rule as rule_lib
from dds_jax.memory import (CLEARANCE, MemoryClassifier, MemoryIndex,
                            MemoryMismatchError, MemoryStore,
                            MemoryStoreError, apply_memory, exact_distances,
                            memory_rule, overlaps)
from tests import conftest
from tests import memory_writer

WRITER = os.path.join(conftest.REPO, "tests", "memory_writer.py")
_HYPO = dict(deadline=None, suppress_health_check=list(HealthCheck),
             derandomize=True)


def _open(path, shape=(2,), **kw):
  kw = {"dataset": "toy", "model_fingerprint": "m0", **kw}
  return MemoryStore.open(path, input_shape=shape, **kw)


def _d(a, b, norm=2):
  return exact_distances(a, np.asarray(b)[None], norm)[0]


# -- properties of the rule ----------------------------------------------------

def _check_sequence(xs, cs, rs, norm):
  """Every property of the rule on one sequence; returns its result."""
  c, r, changed = apply_memory(xs, cs, rs, norm)
  # Same as the rule without any pre-filter, one step at a time.
  mc, mr = [], []
  for i in range(len(xs)):
    ci, ri = memory_rule(xs[i], cs[i], rs[i], xs[:i], np.array(mc, np.int64),
                         np.array(mr), norm)
    mc.append(ci)
    mr.append(ri)
  np.testing.assert_array_equal(c, mc)
  np.testing.assert_array_equal(r, mr)
  np.testing.assert_array_equal(changed, (c != cs) | (r != rs))
  assert np.all(r >= 0) and np.all((c != -1) | (r == 0))
  for i in range(len(xs)):
    d = exact_distances(xs[i], xs[:i], norm)
    d_rev = np.array([_d(xs[j], xs[i], norm) for j in range(i)])
    np.testing.assert_array_equal(d, d_rev)       # symmetric, bitwise
    other = c[:i] != c[i]
    # The invariant, with the rule's own distance and test.
    assert not np.any(overlaps(d, r[i], r[:i])[other]), i
    # Clear of every other-class ball (as given) -> unchanged.
    other_in = c[:i] != cs[i]
    if np.all(d[other_in] >= (rs[i] + r[:i][other_in]) * (1 + CLEARANCE)):
      assert c[i] == cs[i] and r[i] == rs[i], i
    if c[i] == cs[i]:
      assert r[i] <= rs[i]
    else:  # overruled: x_i lies inside an earlier ball of the new class.
      inside = (c[:i] == c[i]) & (d < r[:i])
      assert inside.any()
      assert r[i] <= np.max((r[:i] - d)[inside])
  return c, r, changed


@st.composite
def sequences(draw, dim=2, max_len=14):
  """Certificates with duplicates, nearly touching and nested balls."""
  n = draw(st.integers(1, max_len))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  coord = st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0]),
                    st.floats(0, 1))
  radius = st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5]),
                     st.floats(0, 1))
  xs, cs, rs = [], [], []
  for i in range(n):
    c = draw(st.sampled_from([-1, 0, 1, 2]))
    r = 0.0 if c == -1 else draw(radius)
    kind = draw(st.sampled_from(["random", "dup", "touch", "inside"])) \
        if i else "random"
    if kind == "random":
      if dim == 2:
        x = np.array([draw(coord), draw(coord)])
      else:
        x = rng.uniform(size=dim)
    else:
      j = draw(st.integers(0, i - 1))
      u = rng.normal(size=dim)
      u /= np.linalg.norm(u)
      if kind == "dup":
        x = xs[j]
      elif kind == "touch":
        eps = draw(st.sampled_from([0.0, 1e-15, -1e-15, 1e-9, -1e-9, 1e-6]))
        x = xs[j] + u * (rs[j] + r) * (1 + eps)
      else:
        x = xs[j] + u * rs[j] * draw(st.floats(0, 1))
    xs.append(np.asarray(x, np.float32))
    cs.append(c)
    rs.append(r)
  return np.stack(xs), np.array(cs), np.array(rs)


@settings(max_examples=300, **_HYPO)
@given(sequences(), st.sampled_from([1, 2]))
def test_rule_properties_2d(seq, norm):
  _check_sequence(*seq, norm)


@settings(max_examples=100, **_HYPO)
@given(sequences(dim=48, max_len=10), st.sampled_from([1, 2]))
def test_rule_properties_high_dim(seq, norm):
  xs, cs, rs = seq
  _check_sequence(xs.reshape(-1, 4, 4, 3), cs, rs, norm)


@settings(max_examples=40, **_HYPO)
@given(sequences(max_len=10), st.sampled_from([1, 2]))
def test_store_equals_apply_memory(seq, norm):
  xs, cs, rs = seq
  c, r, changed = apply_memory(xs, cs, rs, norm)
  with tempfile.TemporaryDirectory() as tmp:
    with _open(os.path.join(tmp, "m.sqlite"), norm=norm) as store:
      half = len(xs) // 2
      one = [store.insert(xs[i], int(cs[i]), float(rs[i]))
             for i in range(half)]
      many = store.insert_many(xs[half:], cs[half:], rs[half:], chunk_size=3)
      np.testing.assert_array_equal([o.id for o in one] + list(many.ids),
                                    np.arange(1, len(xs) + 1))
      np.testing.assert_array_equal([o.pred for o in one] + list(many.preds),
                                    c)
      np.testing.assert_array_equal([o.radius for o in one] + list(many.radii),
                                    r)
      np.testing.assert_array_equal(
          [o.changed for o in one] + list(many.changed), changed)
      assert store.check_invariant()
      sx, sc, sr, _ = store.stored()
      np.testing.assert_array_equal(sx, xs)
      np.testing.assert_array_equal(sc, c)


def _naive(xs, cs, rs, norm):
  """The paper's rule, literally, with radii rounded down by nextafter."""
  mem = []
  out_c, out_r = [], []
  for x, c, r in zip(xs, cs, rs):
    d = [_d(x, xj, norm) for xj, _, _ in mem]
    conflicts = [(di - rj, cj) for di, (_, cj, rj) in zip(d, mem)
                 if cj != c and di < r + rj]
    if conflicts:
      m, cj = min(conflicts, key=lambda t: t[0])
      c, r = (cj if m < 0 else c), abs(m)
      while any(cj != c and di < r + rj for di, (_, cj, rj) in zip(d, mem)):
        r = np.nextafter(r, 0.0)
    mem.append((x, c, r))
    out_c.append(c)
    out_r.append(r)
  return np.array(out_c), np.array(out_r)


@pytest.mark.parametrize("norm", [1, 2])
def test_rule_equals_paper_rule_up_to_clearance(norm):
  rng = np.random.default_rng(norm)
  for _ in range(20):
    dim = int(rng.integers(2, 6))
    xs = rng.uniform(size=(40, dim)).astype(np.float32)
    cs = rng.integers(-1, 3, size=40)
    scale = 0.3 * dim if norm == 1 else 0.4 * np.sqrt(dim)
    rs = np.where(cs < 0, 0.0, rng.uniform(0, scale, size=40))
    c, r, changed = apply_memory(xs, cs, rs, norm)
    nc, nr = _naive(xs, cs, rs, norm)
    assert changed.sum() > 5
    np.testing.assert_array_equal(c, nc)
    # The clearance lowers a radius by ~1e-9 of a distance (< 2 here).
    np.testing.assert_allclose(r, nr, rtol=0, atol=1e-8)


@pytest.mark.parametrize("shape,norm", [((16, 16, 3), 2), ((16, 16, 3), 1),
                                        ((700,), 2)])
def test_filter_with_pooled_projection_and_refinement(monkeypatch, shape,
                                                       norm):
  """Many candidates: block-sum projection (spatial blocks, or chunks of a
  flat input) and the full-input Gram bound never drop a row that matters."""
  rng = np.random.default_rng(0)
  base = rng.uniform(size=(1,) + shape).astype(np.float32)
  xs = np.clip(base + rng.normal(scale=0.05, size=(120,) + shape), 0, 1)
  xs = xs.astype(np.float32)
  cs = rng.integers(-1, 4, size=120)
  scale = 1.2 if norm == 2 else 0.04 * np.prod(shape)
  rs = np.where(cs < 0, 0.0, rng.uniform(0, scale, size=120))
  expected = _check_sequence(xs, cs, rs, norm)
  monkeypatch.setattr(rule_lib, "REFINE_MIN", 0)
  monkeypatch.setattr(rule_lib, "_BLAS_MIN_ROWS", 0)   # batched BLAS products
  got = apply_memory(xs, cs, rs, norm)
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)
  assert expected[2].sum() > 20


# -- worked examples -----------------------------------------------------------

def _one(xs, cs, rs, norm=2):
  return apply_memory(np.asarray(xs, np.float32), cs, rs, norm)


def _close_below(got, want):
  assert got <= want and got >= want * (1 - 1e-8), (got, want)


def test_shrink_to_touch():
  c, r, ch = _one([[0, 0], [3, 0]], [0, 1], [1.0, 2.5])
  assert list(c) == [0, 1] and list(ch) == [False, True]
  _close_below(r[1], 2.0)
  assert r[0] == 1.0


def test_overrule_inside_a_different_class_ball():
  c, r, _ = _one([[0, 0], [0.5, 0]], [0, 1], [2.0, 1.0])
  assert list(c) == [0, 0]
  _close_below(r[1], 1.5)


def test_abstain_inside_a_ball_inherits_its_class():
  c, r, ch = _one([[0, 0], [0.25, 0]], [0, -1], [1.0, 0.0])
  assert list(c) == [0, 0] and ch[1]
  _close_below(r[1], 0.75)


def test_ball_containing_an_abstained_point_shrinks_to_touch_it():
  c, r, _ = _one([[0, 0], [0.5, 0]], [-1, 1], [0.0, 1.0])
  assert list(c) == [-1, 1]
  _close_below(r[1], 0.5)


def test_same_class_overlap_unchanged():
  c, r, ch = _one([[0, 0], [0.5, 0], [0.2, 0.1]], [0, 0, 0], [1.0, 1.0, 3.0])
  assert list(c) == [0, 0, 0] and list(r) == [1.0, 1.0, 3.0] and not ch.any()


def test_order_dependence():
  a, b = ([0, 0], 0, 1.0), ([1.5, 0], 1, 1.0)
  c1, r1, _ = _one([a[0], b[0]], [a[1], b[1]], [a[2], b[2]])
  c2, r2, _ = _one([b[0], a[0]], [b[1], a[1]], [b[2], a[2]])
  assert r1[0] == 1.0 and r2[0] == 1.0
  _close_below(r1[1], 0.5)      # b shrinks when a came first,
  _close_below(r2[1], 0.5)      # a shrinks when b came first.
  assert (r1[0], r1[1]) != (r2[1], r2[0])


def test_l1_norm():
  c, r, _ = _one([[0, 0], [1, 1]], [0, 1], [1.0, 1.5], norm=1)
  _close_below(r[1], 1.0)                       # L1 distance 2
  c, r, _ = _one([[0, 0], [1, 1]], [0, 1], [1.0, 1.5], norm=2)
  _close_below(r[1], np.sqrt(2) - 1)            # L2 distance 1.414...


def test_float_edge_exact_touch():
  """0.3 - 0.1 = 0.19999999999999998 and 0.1 + 0.2 > 0.3 in float64."""
  xs = np.array([[0.3], [0.0]])
  c, r, _ = apply_memory(xs, [0, 1], [0.1, 0.2])
  d = _d(xs[1], xs[0])
  assert 0.2 + 0.1 > d                      # would overlap as given
  assert r[1] < 0.2 and not overlaps(d, r[1], r[0])
  assert not overlaps(_d(xs[0], xs[1]), r[0], r[1])
  _close_below(r[1], 0.2)
  index = MemoryIndex((1,), "float64")
  index.add(xs, c, r)
  assert index.check_invariant()
  # The same in float32 storage and 2-D, where sqrt rounds.
  xs = np.array([[0.1, 0.7], [0.4, 0.3]], np.float32)
  d = _d(xs[1], xs[0])
  c, r, _ = apply_memory(xs, [0, 1], [d / 3, 2 * d / 3])
  assert not overlaps(d, r[0], r[1])


def test_bad_certificates_are_refused():
  index = MemoryIndex((2,))
  for x, c, r in [([0, 0, 0], 0, 1.0), ([np.nan, 0], 0, 1.0),
                  ([np.inf, 0], 0, 1.0), ([1e39, 0], 0, 1.0), ([0, 0], 0, -1.0),
                  ([0, 0], 0, np.inf), ([0, 0], 0, np.nan), ([0, 0], -2, 0.0),
                  ([0, 0], 1.5, 1.0), ([0, 0], True, 1.0), ([0, 0], -1, 0.5),
                  (["a", "b"], 0, 1.0)]:
    with pytest.raises(InputError):
      index.insert(np.asarray(x), c, r)
  assert len(index) == 0
  with pytest.raises(InputError):
    apply_memory(np.zeros((2, 2)), [0, 1], [1.0])
  with pytest.raises(InputError):
    apply_memory(np.zeros((1, 2)), [0], [1.0], norm=3)


def test_bad_input_to_store_insert(tmp_path):
  with _open(tmp_path / "m.sqlite") as store:
    for x, c, r in [([0, 0, 0], 0, 1.0), ([np.nan, 0], 0, 1.0),
                    ([0, 0], 0, -1.0), ([0, 0], -3, 0.0), ([0, 0], 0, np.inf)]:
      with pytest.raises(InputError):
        store.insert(np.asarray(x), c, r)
    with pytest.raises(InputError):
      store.insert([0.0, 0.0], 0, 1.0, example_id=1.5)
    assert len(store) == 0 and store.records()["id"].size == 0
    for chunk in (0, 2.5, True):
      with pytest.raises(InputError, match="chunk_size must be an integer"):
        store.insert_many(np.zeros((1, 2)), [0], [1.0], chunk_size=chunk)
    for alpha in (0.0, 1.0, 2, True, "0.1"):
      with pytest.raises(InputError, match=r"alpha must be in \(0, 1\)"):
        store.summary(alpha=alpha)
  for alpha in (0.0, 1.5, True, np.nan):
    with pytest.raises(InputError, match=r"alpha \(when given\) must be in"):
      _open(tmp_path / "n.sqlite", alpha=alpha)
  with pytest.raises(InputError, match="norm must be 1"):
    _open(tmp_path / "n.sqlite", norm=3)


def test_lookup_is_the_deepest_containing_ball():
  index = MemoryIndex((2,))
  index.insert_many(np.array([[0, 0], [0.1, 0], [5, 5]], np.float32),
                    [0, 0, 1], [1.0, 0.5, 1.0])
  pred, radius = index.lookup(np.array([0.15, 0], np.float32))
  assert pred == 0
  np.testing.assert_allclose(radius, 1.0 - 0.15, rtol=1e-6)  # ball 0: deeper
  assert index.lookup(np.array([2.0, 2.0], np.float32)) is None
  assert index.lookup(np.array([5.0, 5.5], np.float32))[0] == 1


# -- the store -----------------------------------------------------------------

def test_reopen_gives_the_same_store(tmp_path):
  path = tmp_path / "m.sqlite"
  xs, cs, rs = memory_writer.certificates(0, 60)
  with _open(path, shape=(3,), alpha=0.01) as store:
    store.insert_many(xs[:30], cs[:30], rs[:30], example_ids=range(30))
    for i in range(30, 60):
      store.insert(xs[i], int(cs[i]), float(rs[i]))
    before = store.stored()
    records = store.records()
    summary = store.summary()
  assert summary["num_stored"] == 60
  assert summary["union_bound"] == pytest.approx(0.6)
  assert summary["num_changed"] == int(records["changed"].sum()) > 0
  with _open(path, shape=(3,), create=False) as store:
    assert store.alpha == 0.01 and len(store) == 60
    for a, b in zip(before, store.stored()):
      np.testing.assert_array_equal(a, b)
    again = store.records()
    for k in records:
      np.testing.assert_array_equal(records[k], again[k])
    np.testing.assert_array_equal(records["raw_pred"], cs)
    np.testing.assert_array_equal(records["raw_radius"], rs)
    assert list(records["example_id"][:31]) == list(range(30)) + [None]
    assert store.check_invariant()
    assert store.summary(alpha=0.5)["union_bound"] == 1.0
  with pytest.raises(MemoryStoreError, match="no memory store"):
    _open(tmp_path / "missing.sqlite", create=False)
  (tmp_path / "empty.sqlite").touch()
  with pytest.raises(MemoryStoreError, match="empty"):
    _open(tmp_path / "empty.sqlite", create=False)


def _sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_mismatched_store_is_refused_and_not_modified(tmp_path):
  path = str(tmp_path / "m.sqlite")
  with _open(path, shape=(2,), alpha=0.001) as store:
    store.insert([0.5, 0.5], 1, 0.2)
  digest = _sha(path)
  for kw, what in [(dict(shape=(3,)), "input_shape"),
                   (dict(model_fingerprint="m1"), "model_fingerprint"),
                   (dict(dataset="other"), "dataset"),
                   (dict(norm=1), "norm"), (dict(dtype="float64"), "dtype"),
                   (dict(alpha=0.01), "alpha")]:
    with pytest.raises(MemoryMismatchError) as e:
      _open(path, **kw)
    assert what in str(e.value) and "another path" in str(e.value)
    assert "stored" in str(e.value) and "requested" in str(e.value)
    assert _sha(path) == digest
  # A newer schema version.
  conn = sqlite3.connect(path)
  conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
  conn.commit()
  conn.close()
  with pytest.raises(MemoryStoreError, match="newer dds_jax"):
    _open(path)
  # Not a store.
  other = tmp_path / "other.sqlite"
  conn = sqlite3.connect(other)
  conn.execute("CREATE TABLE t (a)")
  conn.close()
  with pytest.raises(MemoryStoreError, match="not a dds_jax memory store"):
    _open(other)
  junk = tmp_path / "junk.sqlite"
  junk.write_bytes(b"not a database at all" * 100)
  with pytest.raises(MemoryStoreError, match="cannot open") as info:
    _open(junk)
  # One line for the person, SQLite's own error kept as the cause.
  assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def _writer(path, seed, count, offset, go=None):
  args = [sys.executable, WRITER, str(path), str(seed), str(count),
          str(offset)] + ([str(go)] if go else [])
  return subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                          env=conftest.subprocess_env())


def test_sigkill_keeps_every_committed_certificate(tmp_path):
  path = tmp_path / "m.sqlite"
  proc = _writer(path, seed=7, count=100_000, offset=0)
  assert proc.stdout.readline().strip() == "ready"
  time.sleep(random.Random(os.getpid()).uniform(0.3, 1.2))
  os.kill(proc.pid, signal.SIGKILL)
  reported = [line.split() for line in proc.stdout.read().splitlines()]
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert len(reported) > 5
  xs, cs, rs = memory_writer.certificates(7, 100_000)
  with memory_writer.open_store(path) as store:
    assert store.check_invariant()
    rec = store.records()
    k = len(rec["id"])
    assert k >= len(reported)
    np.testing.assert_array_equal(rec["id"], np.arange(1, k + 1))
    for i, qid, pred, radius in reported:
      i, qid = int(i), int(qid)
      assert qid == i + 1
      assert rec["pred"][i] == int(pred) and rec["radius"][i] == float(radius)
      np.testing.assert_array_equal(rec["x"][i], xs[i])
    c, r, _ = apply_memory(xs[:k], cs[:k], rs[:k])
    np.testing.assert_array_equal(rec["pred"], c)
    np.testing.assert_array_equal(rec["radius"], r)


def test_two_processes_share_one_store(tmp_path):
  path = tmp_path / "m.sqlite"
  go = tmp_path / "go"
  procs = [_writer(path, seed, 50, 1000 * seed, go) for seed in (1, 2)]
  for p in procs:
    assert p.stdout.readline().strip() == "ready"
  go.touch()
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0]
  with memory_writer.open_store(path) as store:
    rec = store.records()
    np.testing.assert_array_equal(rec["id"], np.arange(1, 101))
    assert store.check_invariant()
    assert sorted(rec["example_id"]) == (list(range(1000, 1050)) +
                                         list(range(2000, 2050)))
    c, r, _ = apply_memory(rec["x"], rec["raw_pred"], rec["raw_radius"])
    np.testing.assert_array_equal(rec["pred"], c)
    np.testing.assert_array_equal(rec["radius"], r)
    assert rec["changed"].sum() > 10
    # Each writer was told exactly what was stored under its ids.
    for out in outs:
      lines = out.splitlines()
      assert len(lines) == 50
      for line in lines:
        _, qid, pred, radius = line.split()
        assert rec["pred"][int(qid) - 1] == int(pred)
        assert rec["radius"][int(qid) - 1] == float(radius)


# -- the classifier ------------------------------------------------------------

SHAPE = (4, 4, 1)


def _slab_apply(params, x):
  """Class 0 in a slab |w.x + b| < t, class 1 outside: smoothing with a
  larger sigma moves mass out of the slab, so the certified class depends on
  sigma and data-dependent sigma makes conflicting certificates."""
  z = x.reshape(x.shape[0], -1) @ params["w"] + params["b"]
  z = z * z - params["t"]
  return jnp.stack([-z, z], axis=-1)


@pytest.fixture(scope="module")
def linear():
  rng = np.random.default_rng(0)
  w = rng.normal(size=16).astype(np.float32)
  w /= np.linalg.norm(w)
  params = {"w": jnp.asarray(w), "b": jnp.float32(-float(w.sum()) / 2),
            "t": jnp.float32(0.09)}
  # Inputs spread across the slab along w, 1/11 apart.
  s = rng.permutation(np.linspace(-0.5, 0.5, 12))
  x = 0.5 + s[:, None] * w + 0.01 * rng.normal(size=(12, 16))
  return params, np.clip(x, 0, 1).reshape((12,) + SHAPE).astype(np.float32)


def _sigma_fn(xb):
  """Data-dependent sigma in [0.05, 0.55], a pseudo-random function of x."""
  flat = np.asarray(xb, np.float64).reshape(len(xb), -1)
  return 0.05 + 0.5 * np.abs(np.sin(37.0 * flat.sum(axis=1)))


_CERT = dict(n0=50, n=2000, alpha=0.001, batch_size=1000)


def _classifier(store, params, **kw):
  return MemoryClassifier(store, _slab_apply, params, key=jax.random.key(3),
                          sigma_fn=_sigma_fn, **_CERT, **kw)


def test_classifier_equals_certify_then_apply_memory(tmp_path, linear):
  params, x = linear
  with _open(tmp_path / "a.sqlite", shape=SHAPE, alpha=0.001) as store:
    pred, radius = _classifier(store, params).predict(x)
  cert = dds_jax.certify(_slab_apply, params, x, _sigma_fn(x),
                         jax.random.key(3), example_ids=np.arange(1, 13),
                         **_CERT)
  c, r, changed = apply_memory(x, cert.pred, cert.radius)
  np.testing.assert_array_equal(pred, c)
  np.testing.assert_array_equal(radius, r)
  assert changed.any() and (cert.pred != -1).sum() >= 6
  with _open(tmp_path / "b.sqlite", shape=SHAPE) as store:
    clf = _classifier(store, params)
    one = [clf.predict(xi) for xi in x]
  assert [o[0] for o in one] == list(pred)
  assert [o[1] for o in one] == list(radius)
  assert isinstance(one[0][0], int) and isinstance(one[0][1], float)


def test_classifier_serves_from_memory_without_sampling(tmp_path, linear,
                                                        monkeypatch):
  params, x = linear
  calls = []
  real = classifier_lib.certify

  def counting(*args, **kw):
    calls.append(len(args[2]))
    return real(*args, **kw)

  monkeypatch.setattr(classifier_lib, "certify", counting)
  with _open(tmp_path / "a.sqlite", shape=SHAPE) as store:
    det = _classifier(store, params).predict_details(x)   # canonical
    assert calls == [12] and not det.served.any()
    clf = _classifier(store, params, serve_from_memory=True)
    # A query next to the input with the largest radius.
    j = int(np.argmax(det.radius))
    assert det.radius[j] > 0.05
    near = x[j].copy()
    near[0, 0, 0] += 0.5 * det.radius[j] * (1 if near[0, 0, 0] < 0.5 else -1)
    d = _d(near, x[j])
    pred, radius = clf.predict(near)
    assert calls == [12] and len(store) == 12        # no sampling, no entry
    assert pred == det.pred[j]
    assert radius >= det.radius[j] - d
    assert radius == store.lookup(near)[1]
  # In one batch: the second query lies in the ball of the first, stored
  # earlier in the same batch; it is served, as one at a time.
  calls.clear()
  with _open(tmp_path / "b.sqlite", shape=SHAPE) as store:
    det = _classifier(store, params,
                      serve_from_memory=True).predict_details(
                          np.stack([x[j], near]))
    assert calls == [2] and det.radius[0] > d
    assert list(det.served) == [False, True] and len(store) == 1
    np.testing.assert_allclose(det.radius[1], det.radius[0] - d, rtol=1e-6)
  with _open(tmp_path / "c.sqlite", shape=SHAPE) as store:
    clf = _classifier(store, params, serve_from_memory=True)
    seq = [clf.predict(q) for q in (x[j], near)]
  assert [s[0] for s in seq] == list(det.pred)
  assert [s[1] for s in seq] == list(det.radius)


def test_classifier_checks_its_store(tmp_path, linear):
  params, _ = linear
  with _open(tmp_path / "a.sqlite", shape=SHAPE, norm=1) as store:
    with pytest.raises(InputError, match="L2"):
      _classifier(store, params)
    with pytest.raises(InputError, match="noise must be one of"):
      _classifier(store, params, noise="laplace")
    assert _classifier(store, params, noise="uniform").store is store
  with _open(tmp_path / "c.sqlite", shape=SHAPE) as store:
    with pytest.raises(InputError, match=r"alpha must be in \(0, 1\)"):
      MemoryClassifier(store, _slab_apply, params, sigma=0.5,
                       key=jax.random.key(0), **dict(_CERT, alpha=1.0))
  with _open(tmp_path / "b.sqlite", shape=SHAPE, alpha=0.01) as store:
    with pytest.raises(InputError, match="alpha"):
      _classifier(store, params)
    clf = MemoryClassifier(store, _slab_apply, params, sigma=0.5,
                           key=jax.random.key(0), **dict(_CERT, alpha=0.01))
    with pytest.raises(InputError):
      clf.predict(np.zeros((4, 4, 3), np.float32))


def test_public_names():
  for name in memory.__all__:
    assert hasattr(memory, name)


@pytest.mark.parametrize("shape", [(2,), (700,), (16, 16, 3), (8, 8, 1)])
@pytest.mark.parametrize("norm", [1, 2])
def test_filter_keeps_every_row_at_the_threshold(shape, norm):
  """Radii set so that rows sit exactly at (or 1 ulp inside) the threshold."""
  rng = np.random.default_rng(1)
  for scale in (1e-3, 1.0, 300.0):
    xs = (rng.uniform(size=(200,) + shape) * scale).astype(np.float32)
    xs[100:] = xs[:100] + (rng.normal(size=(100,) + shape) *
                           1e-3 * scale).astype(np.float32)
    q = xs[rng.integers(200)] + (rng.normal(size=shape) *
                                 1e-2 * scale).astype(np.float32)
    d = exact_distances(q, xs, norm)
    r = float(rng.uniform(0, 0.5) * np.median(d))
    radii = np.maximum(d / (1 + CLEARANCE) - r, 0.0)
    radii[::2] = np.nextafter(radii[::2], np.inf)
    index = MemoryIndex(shape, "float32", norm)
    index.add(xs, np.zeros(200, np.int64), radii)
    # pylint: disable=protected-access
    query = index._queries(q[None])[0]
    key = index._filter_keys(
        query, rule_lib._dots(index._p[:200], query.p32[None])[0])
    matters = np.flatnonzero(d < (r + radii) * (1 + CLEARANCE))
    assert len(matters) >= 15
    assert np.all(key[matters] < r * rule_lib._FILTER)


# -- the invariant check since a row --------------------------------------------

def _overlapping_then_apart():
  """Entries 0, 1 overlap (classes 0, 1); entries 2.. are far from everyone."""
  xs = np.array([[0, 0], [0.5, 0], [10, 0], [20, 0], [30, 0]], np.float32)
  return xs, np.array([0, 1, 0, 1, 2]), np.array([1.0, 1.0, 0.5, 0.5, 0.5])


def test_check_invariant_since_examines_only_pairs_with_a_new_entry(
    monkeypatch):
  xs, cs, rs = _overlapping_then_apart()
  index = MemoryIndex((2,))
  index.add(xs, cs, rs)       # as given, without the rule: 0 and 1 overlap
  assert not index.check_invariant()
  assert index.violations() == [(0, 1, pytest.approx(0.5))]
  with pytest.raises(memory.MemoryInvariantError, match="entries 1 and 2"):
    index.check_invariant(raise_error=True)
  # The old-vs-old pair (0, 1) is not looked at once both are before `since`.
  for since in (2, 3, 5):
    assert index.check_invariant(since=since)
    assert index.violations(since=since) == []
  assert not index.check_invariant(since=1)     # (0, 1) has the new entry 1
  # A new entry overlapping an old one is found.
  index.add(np.array([[19.8, 0]], np.float32), [0], [0.5])
  assert index.violations(since=5) == [(3, 5, pytest.approx(0.2, rel=1e-5))]
  assert not index.check_invariant(since=5)
  with pytest.raises(memory.MemoryInvariantError, match="entries 4 and 6"):
    index.check_invariant(raise_error=True, since=3)
  # since = 0 is the full check; since = k checks nothing.
  assert index.violations(since=0) == index.violations()
  assert index.check_invariant(since=6)
  # The cost: only the entries from `since` on are queries (O(new * k)).
  queries = []
  dots = rule_lib._dots  # pylint: disable=protected-access
  monkeypatch.setattr(rule_lib, "_dots",
                      lambda rows, q: queries.append(len(q)) or dots(rows, q))
  index.check_invariant(since=4)
  assert sum(queries) == 2
  for bad in (-1, 7, 1.5, True, None):
    with pytest.raises(InputError, match="since"):
      index.check_invariant(since=bad)


def test_store_check_invariant_since(tmp_path):
  path = tmp_path / "m.sqlite"
  xs, cs, rs = _overlapping_then_apart()
  with _open(path) as store:
    # Another writer broke the invariant between entries 1 and 2 (ids).
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO certificates (id, x, pred, radius, raw_pred, raw_radius, "
        "changed, example_id, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, NULL, "
        "'now')", [(i + 1, xs[i].tobytes(), int(cs[i]), float(rs[i]),
                    int(cs[i]), float(rs[i])) for i in range(2)])
    db.commit()
    db.close()
    before = len(store)
    assert before == 2
    res = store.insert_many(xs[2:], cs[2:], rs[2:])
    assert not res.changed.any()
    assert store.check_invariant(since=before)
    assert not store.check_invariant()
    assert not store.check_invariant(since=0)
    with pytest.raises(memory.MemoryInvariantError, match="entries 1 and 2"):
      store.check_invariant(raise_error=True)
    with pytest.raises(InputError, match="since"):
      store.check_invariant(since=len(store) + 1)


# --- Network filesystems (pods), detected from a simulated mounts table. ---

def _mounts(tmp_path, fstype):
  return (f"/dev/sda1 / ext4 rw 0 0\n"
          f"server:/export {tmp_path} {fstype} rw,relatime 0 0\n")


def _store(path, **kw):
  return MemoryStore(path, input_shape=(2,), dataset="d",
                     model_fingerprint="m", **kw)


def test_filesystem_type_is_the_longest_mount_prefix(tmp_path):
  from dds_jax.memory import filesystem_type
  table = _mounts(tmp_path, "nfs4")
  assert filesystem_type(tmp_path / "a" / "memory.sqlite", table) == "nfs4"
  assert filesystem_type("/somewhere/else", table) == "ext4"
  assert filesystem_type(str(tmp_path) + "x/f", table) == "ext4"


def test_nfs_is_refused_unless_exclusive(tmp_path):
  table = _mounts(tmp_path, "nfs")
  with pytest.raises(MemoryStoreError, match="memory.network='exclusive'"):
    _store(tmp_path / "m.sqlite", mounts=table)
  assert not (tmp_path / "m.sqlite").exists()
  with _store(tmp_path / "m.sqlite", mounts=table, network="exclusive") as s:
    s.insert(np.array([0.1, 0.2], np.float32), 1, 0.5)
    assert s.exclusive and s.summary()["filesystem"] == "nfs"
    mode = s._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "delete"
  assert not os.path.exists(str(tmp_path / "m.sqlite") + "-wal")
  with _store(tmp_path / "m.sqlite", mounts=table, network="exclusive") as s:
    assert len(s) == 1   # reopened: the certificate persisted


def test_a_mount_without_posix_locks_is_always_refused(tmp_path):
  table = _mounts(tmp_path, "fuse.gcsfuse")
  for network in ("refuse", "exclusive"):
    with pytest.raises(MemoryStoreError, match="no POSIX locks"):
      _store(tmp_path / "m.sqlite", mounts=table, network=network)


def test_default_path_leaves_a_network_results_dir(tmp_path):
  from dds_jax.memory import default_path
  results = tmp_path / "results"
  local = tmp_path / "local"
  assert default_path(results, "/dev/sda1 / ext4 rw 0 0\n") == str(
      results / "memory.sqlite")
  got = default_path(results, _mounts(tmp_path, "nfs4"), local_dir=str(local))
  assert got.startswith(str(local)) and got.endswith("memory.sqlite")
  assert got == default_path(results, _mounts(tmp_path, "nfs4"),
                             local_dir=str(local))  # stable per results dir
