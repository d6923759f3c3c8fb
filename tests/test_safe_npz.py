"""``safe_npz``: what np.savez writes reads back unchanged, and a hostile archive is refused in one
line before it can allocate more than its budget (issue 20)."""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest

import hostile_bodies as hb
from infantino.edge_runtime.core import safe_npz


def test_what_numpy_writes_reads_back_unchanged_stored_or_deflated():
    arrays = {"coef_0": np.arange(12, dtype=np.float32).reshape(3, 4), "f": np.asfortranarray(np.ones((3, 5))),
              "classes": np.asarray(["happy", "sad"]), "meta": np.asarray('{"x": 1}'), "n": np.asarray(7, np.int64),
              "b": np.array([True, False]), "h": np.zeros((0, 3), np.float16), "u": np.arange(5, dtype=np.uint8)}
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, **arrays)
        with safe_npz.load(buf.getvalue()) as got:
            assert got.files == list(arrays)
            for k, a in arrays.items():
                np.testing.assert_array_equal(got[k], a)
                assert got[k].dtype == a.dtype and got[k].flags.writeable


@pytest.mark.parametrize("claimed", [1000, 0, 2 ** 32 - 1, None])
def test_a_zip_bomb_is_cut_off_within_one_chunk_of_its_budget(claimed):
    body = hb.bomb(256 << 20, claimed)  # 256 MiB of zeros in ~250 KB
    tracemalloc.start()
    try:
        with pytest.raises(safe_npz.NpzError) as refused:
            safe_npz.read_npz(body, max_inflated=4 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(str(refused.value).splitlines()) == 1
    assert peak < len(body) + (4 << 20) + 4 * safe_npz.CHUNK, f"peak {peak >> 20} MiB"


@pytest.mark.parametrize("descr,shape", hb.HEADER_CASES)
def test_every_bent_header_field_is_a_one_line_refusal(descr, shape):
    for fortran in ("False", "True"):
        raw = hb.npy(descr, shape, b"\0" * 16, fortran)
        with pytest.raises(safe_npz.NpzError) as refused:
            safe_npz.read_npy(raw)
        assert len(str(refused.value).splitlines()) == 1


def test_other_npy_versions_and_lying_headers_are_refused():
    for raw, why in ((hb.npy("'<f4'", "(10**12,)", b"", version=b"\x02\x00"), "version 2.0"),
                     (hb.npy("'<f4'", "(4,)", b"\0" * 8), "promises 16"),
                     (hb.npy("'<f4'", "(2,)", b"\0" * 16), "promises 8"),
                     (b"\x93NUMPY\x01\x00\xff\xff{'descr'", "header")):
        with pytest.raises(safe_npz.NpzError, match=why):
            safe_npz.read_npy(raw)


def test_fortran_order_arrays_keep_their_values():
    a = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(safe_npz.read_npy(hb.npy_of(a)), a)
