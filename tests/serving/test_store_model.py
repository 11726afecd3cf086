"""The memory and SQLite stores against a model of what a store is: a plain dict in write order
(the oldest write evicted first, a re-put refreshing its entry) and exact cosine ranking in numpy.

Hypothesis drives random sequences of put_many (ids repeated across calls and within one call,
with and without filenames, several store keys, a bound small enough that evictions happen),
get_many, filenames, search (with exclude) and, for SQLite, closing and reopening the file. After
every call the store must answer what the model answers, and its similarity index must hold
exactly the vectors the store holds. Derandomised: every run tries the same sequences.

Vectors are small integer directions scaled by powers of two: two vectors of one direction have
bit-identical unit rows, so their scores tie exactly and the tie must be broken by id, while
different directions are compared with a float tolerance.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise, product
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from app.serving.store import EmbeddingStore, MemoryStore, SQLiteStore
from app.serving.store.vector_index import Neighbor

KEYS = ["k0", "k1", "k2"]
IDS = [f"i{n}" for n in range(7)]
NAMES = [None, None, "a.png", "b.png"]
# directions: no two are positive multiples of each other; the zero vector matches nothing
DIRECTIONS = [np.array(d, dtype=np.int64) for d in product((-1, 0, 1), repeat=3)] + [
    np.array(d, dtype=np.int64) for d in ((2, 1, 0), (1, -2, 1), (2, -1, -1), (0, 1, 2))]
X_AXIS = next(n for n, d in enumerate(DIRECTIONS) if tuple(d) == (1, 0, 0))
TOL = 1e-5


@dataclass(frozen=True)
class Vec:
    direction: int  # index into DIRECTIONS: equal directions tie exactly
    scale: int  # a power of two

    @property
    def array(self) -> np.ndarray:
        return (DIRECTIONS[self.direction] * self.scale).astype(np.float32)


@dataclass
class Entry:
    vec: Vec
    name: str | None


class Model:
    """What a store must hold: (key, id) -> entry in write order, at most max_items."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.data: OrderedDict[tuple[str, str], Entry] = OrderedDict()

    def put(self, key: str, items: list[tuple[str, Vec]], names: list[str | None]) -> None:
        # one call is its items one after the other, the bound applied at the end of the call:
        # a repeated id keeps its last vector, the last filename given, and the last position
        for (image_id, vec), name in zip(items, names, strict=True):
            old = self.data.pop((key, image_id), None)
            self.data[(key, image_id)] = Entry(vec, name if name is not None or old is None
                                               else old.name)
        while len(self.data) > self.max_items:
            self.data.popitem(last=False)

    def of(self, key: str) -> dict[str, Entry]:
        return {i: e for (k, i), e in self.data.items() if k == key}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return 0.0 if na == 0 or nb == 0 else float(a.astype(np.float64) @ b) / (na * nb)


def check_search(got: list[Neighbor], stored: dict[str, Entry], query: Vec, k: int,
                 exclude: str | None) -> None:
    """Best first by exact cosine, the k best, ties of one direction in id order, no exclude."""
    candidates = {i: e for i, e in stored.items() if i != exclude}
    score = {i: cosine(e.vec.array, query.array) for i, e in candidates.items()}
    ids = [n.id for n in got]
    assert len(ids) == min(k, len(candidates)), (ids, sorted(candidates))
    assert len(set(ids)) == len(ids) and set(ids) <= set(candidates), ids
    for n in got:
        assert abs(n.score - score[n.id]) <= TOL, (n, score[n.id])
        assert n.filename == candidates[n.id].name, (n, candidates[n.id])
    for a, b in pairwise(ids):
        assert score[a] >= score[b] - TOL, (ids, score)
    left_out = [i for i in candidates if i not in ids]
    for i in left_out:  # nothing left out beats what was returned, or ties with it by a lower id
        assert all(score[i] <= score[j] + TOL for j in ids), (ids, i, score)
    ranked = ids + left_out
    for x, a in enumerate(ranked):
        for b in ranked[x + 1:]:
            if candidates[a].vec.direction == candidates[b].vec.direction and (
                    a in ids or b in ids):
                assert a < b, f"{a} and {b} tie exactly: the lower id comes first ({ids})"


def check_index(store: EmbeddingStore, model: Model) -> None:
    """The similarity index holds exactly what the store holds, key by key."""
    probe = Vec(X_AXIS, 1)
    for key in KEYS:
        stored = model.of(key)
        got = store.search(key, probe.array, len(IDS) + 1)
        assert sorted(n.id for n in got) == sorted(stored), (key, got, sorted(stored))


# -- the operations ------------------------------------------------------------------------------
vecs = st.builds(Vec, st.integers(0, len(DIRECTIONS) - 1), st.sampled_from([1, 2, 4]))
ids = st.sampled_from(IDS)
keys = st.sampled_from(KEYS)


@dataclass(frozen=True)
class Put:
    key: str
    items: list[tuple[str, Vec]]
    names: list[str | None] | None  # None: put_many called without filenames


@dataclass(frozen=True)
class Get:
    key: str
    ids: list[str]


@dataclass(frozen=True)
class Filenames:
    key: str
    ids: list[str]


@dataclass(frozen=True)
class Search:
    key: str
    query: Vec
    k: int
    exclude: str | None


@dataclass(frozen=True)
class Reopen:
    pass


@st.composite
def puts(draw: st.DrawFn) -> Put:
    items = draw(st.lists(st.tuples(ids, vecs), max_size=6))
    named = draw(st.booleans())
    names = [draw(st.sampled_from(NAMES)) for _ in items] if named else None
    return Put(draw(keys), items, names)


def operations(reopen: bool) -> st.SearchStrategy[list[object]]:
    op = st.one_of(
        puts(), puts(),  # twice as likely: the store's state comes from writes
        st.builds(Get, keys, st.lists(ids, max_size=4)),
        st.builds(Filenames, keys, st.lists(ids, max_size=4)),
        st.builds(Search, keys, vecs, st.integers(1, 8), st.none() | ids),
        *([st.just(Reopen())] if reopen else []),
    )
    return st.lists(op, max_size=30)


# -- the driver ----------------------------------------------------------------------------------
def run(open_store: Callable[[], EmbeddingStore], max_items: int, ops: list[object]) -> None:
    model = Model(max_items)
    store = open_store()
    try:
        for op in ops:
            if isinstance(op, Reopen):
                store.close()
                store = open_store()
                check_index(store, model)
            elif isinstance(op, Put):
                arrays = [(i, v.array) for i, v in op.items]
                store.put_many(op.key, arrays, op.names)
                model.put(op.key, list(op.items), op.names or [None] * len(op.items))
                assert store.count() == len(model.data)
                check_index(store, model)
            elif isinstance(op, Get):
                got = store.get_many(op.key, op.ids)
                stored = model.of(op.key)
                assert sorted(got) == sorted({i for i in op.ids if i in stored})
                for i, v in got.items():
                    assert v.dtype == np.float32
                    np.testing.assert_array_equal(v, stored[i].vec.array)
            elif isinstance(op, Filenames):
                stored = model.of(op.key)
                assert store.filenames(op.key, op.ids) == {i: stored[i].name for i in op.ids
                                                           if i in stored}
            elif isinstance(op, Search):
                check_search(store.search(op.key, op.query.array, op.k, op.exclude),
                             model.of(op.key), op.query, op.k, op.exclude)
    finally:
        store.close()


@contextmanager
def sqlite_opener(max_items: int) -> Iterator[Callable[[], EmbeddingStore]]:
    with tempfile.TemporaryDirectory() as tmp:
        yield lambda: SQLiteStore(Path(tmp) / "emb.sqlite3", max_items)


# ~10 s each on the 2-core CI machine
PROPERTY = settings(derandomize=True, max_examples=250, deadline=None)


@PROPERTY
@given(max_items=st.integers(1, 6), ops=operations(reopen=False))
def test_memory_store_matches_the_model(max_items: int, ops: list[object]) -> None:
    run(lambda: MemoryStore(max_items), max_items, ops)


@PROPERTY
@given(max_items=st.integers(1, 6), ops=operations(reopen=True))
def test_sqlite_store_matches_the_model(max_items: int, ops: list[object]) -> None:
    with sqlite_opener(max_items) as opener:
        run(opener, max_items, ops)


def test_the_model_itself() -> None:
    """The model's own rules, spelled out: last vector and last given name win, order refreshed."""
    m = Model(2)
    a, b = Vec(1, 1), Vec(2, 1)
    m.put("k", [("x", a), ("y", b), ("x", b)], ["x.png", None, None])
    assert list(m.data) == [("k", "y"), ("k", "x")]
    assert m.data[("k", "x")] == Entry(b, "x.png")
    m.put("k", [("z", a)], [None])
    assert list(m.data) == [("k", "x"), ("k", "z")]
