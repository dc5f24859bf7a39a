"""Chunk planning: chunks tile tensors and files exactly, within the size budget."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mzstore.errors import FormatError
from mzstore.format.dtypes import DTYPES, nbytes_for, row_bytes
from mzstore.push.planner import ChunkPlan, plan_file, plan_tensor

ALL_DTYPES = sorted(DTYPES)


def tensor_nbytes(name: str, shape: tuple[int, ...]) -> int:
    return nbytes_for(DTYPES[name], math.prod(shape))


def assert_tiles(chunks: list[ChunkPlan], nbytes: int, n_rows: int) -> None:
    """Chunks are numbered in order and cover bytes [0, nbytes) and rows [0, n_rows) contiguously."""
    assert chunks
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].byte_start == 0 and chunks[0].row_start == 0
    assert chunks[-1].byte_end == nbytes and chunks[-1].row_end == n_rows
    for prev, nxt in itertools.pairwise(chunks):
        assert nxt.byte_start == prev.byte_end
        # Whole-row chunks tile the rows; byte-range chunks may share a row.
        assert nxt.row_start == prev.row_end or (prev.row_start <= nxt.row_start < prev.row_end)
    for c in chunks:
        assert 0 <= c.byte_start <= c.byte_end <= nbytes
        assert c.row_start <= c.row_end
        assert c.nbytes == c.byte_end - c.byte_start
    assert sum(c.nbytes for c in chunks) == nbytes
    if len(chunks) > 1:
        assert all(c.nbytes > 0 for c in chunks)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(ALL_DTYPES),
    shape=st.lists(st.integers(0, 12), min_size=0, max_size=4).map(tuple),
    chunk_bytes=st.one_of(st.integers(1, 64), st.integers(1, 100_000)),
)
def test_plan_tensor_tiles(name, shape, chunk_bytes):
    dtype = DTYPES[name]
    try:
        nbytes = tensor_nbytes(name, shape)
    except FormatError:
        assume(False)  # sub-byte tensors that are not whole bytes cannot exist
    chunks = plan_tensor(dtype, shape, nbytes, chunk_bytes)
    n_rows = shape[0] if shape else 1
    assert_tiles(chunks, nbytes, n_rows)

    rb = row_bytes(dtype, shape)
    if rb:
        assert nbytes == n_rows * rb
    element = max(1, dtype.bits // 8) if dtype.bits % 8 == 0 else 1
    for i, c in enumerate(chunks):
        # The memory bound: never more than the budget (or one element).
        assert c.nbytes <= max(chunk_bytes, element)
        # Chunks hold whole elements, so every codec can decode them alone.
        assert c.byte_start % element == 0
        if rb is not None and 0 < rb <= chunk_bytes:
            # Whole rows, greedily as many as fit.
            assert c.byte_start == c.row_start * rb and c.byte_end == c.row_end * rb
            if i < len(chunks) - 1:
                assert c.nbytes > chunk_bytes - rb
        elif rb:
            # Byte ranges record the rows they touch.
            assert c.row_start == c.byte_start // rb and c.row_end == -(-c.byte_end // rb)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 5000),
    row_len=st.integers(1, 64),
    name=st.sampled_from(["F32", "BF16", "U8", "F64", "I64", "F8_E4M3"]),
    chunk_bytes=st.integers(1, 4096),
)
def test_plan_tensor_chunk_count(rows, row_len, name, chunk_bytes):
    dtype = DTYPES[name]
    rb = row_len * dtype.bits // 8
    nbytes = rows * rb
    chunks = plan_tensor(dtype, (rows, row_len), nbytes, chunk_bytes)
    assert_tiles(chunks, nbytes, rows)
    if nbytes <= chunk_bytes:
        assert len(chunks) == 1
    elif rb <= chunk_bytes:
        assert len(chunks) == -(-rows // (chunk_bytes // rb))
    else:
        step = max(dtype.itemsize, chunk_bytes - chunk_bytes % dtype.itemsize)
        assert len(chunks) == -(-nbytes // step)


def test_rows_larger_than_the_budget_are_split_inside_rows():
    dtype = DTYPES["F32"]
    chunks = plan_tensor(dtype, (5, 100), 5 * 400, 100)
    assert len(chunks) == 20
    assert all(c.nbytes == 100 for c in chunks)
    assert [(c.row_start, c.row_end) for c in chunks[:5]] == [(0, 1)] * 4 + [(1, 2)]


def test_a_hostile_single_row_cannot_force_a_huge_chunk():
    dtype = DTYPES["F32"]
    nbytes = 4 * 10**12  # a header may claim a [1, 10**12] tensor
    chunks = plan_tensor(dtype, (1, 10**12), nbytes, 16 << 20)
    assert max(c.nbytes for c in chunks[:3]) <= 16 << 20


def test_whole_tensor_fits():
    dtype = DTYPES["BF16"]
    chunks = plan_tensor(dtype, (8, 8), 128, 128)
    assert chunks == [ChunkPlan(0, 0, 8, 0, 128)]


@pytest.mark.parametrize("name", ["F32", "BF16", "U8", "F8_E5M2", "C64", "F64"])
def test_scalar_is_one_chunk(name):
    dtype = DTYPES[name]
    nbytes = tensor_nbytes(name, ())
    for chunk_bytes in (1, nbytes, 1 << 20):
        chunks = plan_tensor(dtype, (), nbytes, chunk_bytes)
        assert len(chunks) == 1
        assert_tiles(chunks, nbytes, 1)


@pytest.mark.parametrize("shape", [(0,), (0, 16), (0, 3, 3)])
def test_zero_row_tensor_is_one_empty_chunk(shape):
    chunks = plan_tensor(DTYPES["F32"], shape, 0, 1)
    assert len(chunks) == 1
    assert_tiles(chunks, 0, 0)


@pytest.mark.parametrize("shape", [(16, 0), (1000, 0, 4), (3, 2, 0)])
def test_zero_size_tensor_is_one_empty_chunk(shape):
    chunks = plan_tensor(DTYPES["BF16"], shape, 0, 1)
    assert len(chunks) == 1
    assert_tiles(chunks, 0, shape[0])


@pytest.mark.parametrize(
    ("shape", "name"), [((1000, 3), "F4"), ((200, 5), "F4"), ((400, 3), "F6_E2M3"), ((1000,), "F4")]
)
def test_sub_byte_rows_are_split_by_bytes(shape, name):
    dtype = DTYPES[name]
    assert row_bytes(dtype, shape) is None
    nbytes = tensor_nbytes(name, shape)
    assert nbytes > 16
    chunks = plan_tensor(dtype, shape, nbytes, 16)
    assert len(chunks) == -(-nbytes // 16)
    assert all(c.nbytes <= 16 for c in chunks)
    assert all((c.row_start, c.row_end) == (0, shape[0]) for c in chunks)


def test_sub_byte_whole_byte_rows_split():
    # F4 rows of 4 values are 2 bytes each, so they can be split.
    dtype = DTYPES["F4"]
    assert row_bytes(dtype, (100, 4)) == 2
    chunks = plan_tensor(dtype, (100, 4), 200, 20)
    assert len(chunks) == 10
    assert_tiles(chunks, 200, 100)


def test_row_bytes():
    assert row_bytes(DTYPES["F32"], ()) is None
    assert row_bytes(DTYPES["F32"], (7,)) == 4
    assert row_bytes(DTYPES["BF16"], (7, 3, 5)) == 30
    assert row_bytes(DTYPES["F4"], (7, 3)) is None
    assert row_bytes(DTYPES["F4"], (7, 6)) == 3
    assert row_bytes(DTYPES["F6_E3M2"], [2, 4]) == 3
    assert row_bytes(DTYPES["U8"], (5, 0)) == 0


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.tuples(st.integers(0, 500), st.integers(1, 16)),
        st.tuples(st.integers(0, 200_000), st.integers(100, 50_000)),
    )
)
def test_plan_file_tiles(case):
    size, chunk_bytes = case
    chunks = plan_file(size, chunk_bytes)
    assert_tiles(chunks, size, size)
    for c in chunks:
        # Rows are bytes for files.
        assert (c.row_start, c.row_end) == (c.byte_start, c.byte_end)
        assert c.nbytes <= chunk_bytes
    assert len(chunks) == max(1, -(-size // chunk_bytes))
    assert all(c.nbytes == chunk_bytes for c in chunks[:-1])


def test_plan_file_empty():
    assert plan_file(0, 1024) == [ChunkPlan(0, 0, 0, 0, 0)]
    assert plan_file(0, 1) == [ChunkPlan(0, 0, 0, 0, 0)]


def test_plan_file_exact_multiple():
    chunks = plan_file(3 * 4096, 4096)
    assert [(c.byte_start, c.byte_end) for c in chunks] == [(0, 4096), (4096, 8192), (8192, 12288)]
