"""State snapshots: atomic generations, checksums, the last good one after corruption."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from infantino.edge_runtime.state import StateError, StateStore, decode, encode


def _arrays(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), v, np.float32), "n": np.arange(4)}


def test_round_trip_and_generations(tmp_path):
    store = StateStore(tmp_path, keep=2)
    assert store.load() is None
    assert store.save(_arrays(1), {"k": 1}) == 1
    assert store.save(_arrays(2), {"k": 2}) == 2
    assert store.save(_arrays(3), {"k": 3}) == 3
    snap = store.load()
    assert snap.generation == 3 and snap.meta == {"k": 3}
    np.testing.assert_array_equal(snap.arrays["w"], _arrays(3)["w"])
    assert [g for g, _ in store.generations()] == [3, 2]  # older ones pruned
    assert (tmp_path / "state.json").is_file()


def test_a_corrupt_newest_snapshot_falls_back_to_the_last_good_one(tmp_path, caplog):
    store = StateStore(tmp_path)
    store.save(_arrays(1), {"k": 1})
    store.save(_arrays(2), {"k": 2})
    newest = store.generations()[0][1]
    data = bytearray(newest.read_bytes())
    data[-20] ^= 0x55  # one flipped bit in the payload
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        snap = store.load()
    assert snap.generation == 1 and snap.meta == {"k": 1}
    assert "corrupt" in caplog.text and "checksum" in caplog.text
    assert newest.with_name(newest.name + ".corrupt").exists()
    # The bad file is set aside; the next save is the newest valid generation.
    assert store.save(_arrays(3), {"k": 3}) == 2
    assert store.load().meta == {"k": 3}


def test_truncated_and_foreign_files_are_refused(tmp_path):
    data = encode(_arrays(1), {"k": 1})
    for bad, message in ((data[: len(data) // 2], "checksum mismatch"), (b"PK\x03\x04 not ours", "not an InfantinO state file"),
                         (data[:30], "truncated header")):
        with pytest.raises(StateError, match=message):
            decode(bad)
    assert decode(data)[1] == {"k": 1}


def test_every_snapshot_corrupt_is_an_error_not_a_silent_reset(tmp_path):
    store = StateStore(tmp_path)
    store.save(_arrays(1), {"k": 1})
    store.generations()[0][1].write_bytes(b"garbage")
    with pytest.raises(StateError, match="no valid state"):
        store.load()


def test_temp_files_of_a_killed_writer_are_cleaned_on_the_next_save(tmp_path):
    store = StateStore(tmp_path)
    (tmp_path / ".snapshot-0000000001.bin.abc.tmp").write_bytes(b"half")
    store.save(_arrays(1), {})
    assert not list(tmp_path.glob("*.tmp")) and store.load().generation == 1
