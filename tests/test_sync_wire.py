"""The update wire format: npz in, arrays out, never a pickle, never a surprise."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from infantino.edge_runtime.core import wire


def test_round_trip_keeps_dtype_shape_values_and_writability():
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1.5, -2.0]), "c": np.float32(7),
              "d": np.zeros((0, 3), np.float32), "e": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              "f": np.array([1, 2], dtype=">i4")}
    meta, out = wire.decode(wire.encode({"x": 1}, arrays))
    assert meta == {"x": 1}
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)
        assert out[k].flags.writeable


def test_update_body_names_layers_in_flower_order():
    layers = [np.ones((4, 3)), np.ones((3, 2)), np.zeros(3), np.zeros(2)]
    meta, arrays = wire.decode(wire.encode_update(device="cam", base_head_version=3, base_package_version="p", layers=layers,
                                                  n_samples=5, idempotency_key="key-000001"))
    assert meta["format"] == wire.UPDATE_FORMAT and meta["kind"] == "weights" and meta["n_samples"] == 5
    back = wire.dict_to_layers(arrays, 2)
    assert [a.shape for a in back] == [(4, 3), (3, 2), (3,), (2,)] and all(a.dtype == np.float32 for a in back)
    with pytest.raises(wire.WireError, match="unexpected"):
        wire.dict_to_layers({**arrays, "coef_7": np.zeros(1)}, 2)


def _npz_with(name: str, raw: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("meta.npy", _npy(np.asarray('{"a": 1}')))
        zf.writestr(name, raw)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_hostile_npz_members_are_refused():
    good = _npy(np.zeros((4, 4), np.float32))
    lying = good.replace(b"(4, 4)", b"(9, 9)")  # the header promises more data than there is
    truncated = good[:-8]
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    for raw, why in ((lying, "header promises"), (truncated, "header promises"), (buf.getvalue(), "pickle")):
        with pytest.raises(wire.WireError, match=why):
            wire.decode(_npz_with("w.npy", raw))
    with pytest.raises(wire.WireError, match="not an .npy"):
        wire.decode(_npz_with("w.txt", b"hello"))
    with pytest.raises(wire.WireError, match="entries"):
        wire.decode(wire.encode({}, {f"a{i}": np.zeros(1) for i in range(40)}))
    meta_list = io.BytesIO()
    with zipfile.ZipFile(meta_list, "w") as zf:
        zf.writestr("meta.npy", _npy(np.asarray("[1, 2]")))
    with pytest.raises(wire.WireError, match="JSON object"):
        wire.decode(meta_list.getvalue())


def test_a_flipped_byte_or_a_compressed_body_is_handled():
    body = wire.encode({"a": 1}, {"coef_0": np.ones((8, 8), np.float32)})
    broken = bytearray(body)
    broken[body.find(b"coef_0.npy") + 120] ^= 0xFF
    with pytest.raises(wire.WireError, match="corrupt"):
        wire.decode(bytes(broken))
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.asarray('{"a": 1}'), coef_0=np.ones((3, 3), np.float32))
    meta, arrays = wire.decode(buf.getvalue())
    assert meta == {"a": 1} and arrays["coef_0"].sum() == 9
