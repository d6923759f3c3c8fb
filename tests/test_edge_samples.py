"""Kept face crops on disk: an append-only log whose save costs the same on day 1 and day 100,
that survives a torn tail, compacts itself, and reads the older ``samples.npz``."""
from __future__ import annotations

import io

import numpy as np

from infantino.edge_runtime.core.atomic import atomic_write_bytes
from infantino.edge_runtime.samples import LEGACY_NAME, LOG_NAME, SampleKeeper

RECORD = 8 + 9 + 16 * 16  # frame + record head + one 16x16 crop


def crop(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)


def same(a: SampleKeeper, b: SampleKeeper) -> None:
    (ca, la), (cb, lb) = a.all(), b.all()
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a.seen, b.seen)
    for x, y in zip(ca, cb):
        np.testing.assert_array_equal(x, y)


def test_each_save_appends_only_the_new_crops_whatever_is_kept_already(tmp_path):
    keeper = SampleKeeper(tmp_path, per_class=4, n_classes=3)
    keeper.add(crop(0), 0)  # the first save writes the log
    sizes = [(tmp_path / LOG_NAME).stat().st_size]
    for i in range(1, 40):  # reservoirs fill up, then crops replace kept ones
        keeper.add(crop(i), i % 3)
        sizes.append((tmp_path / LOG_NAME).stat().st_size)
    assert set(np.diff(sizes)) == {RECORD}
    assert len(keeper) == 12 and keeper.seen.tolist() == [14, 13, 13]
    same(keeper, SampleKeeper(tmp_path, per_class=4, n_classes=3))


def test_a_torn_tail_is_ignored_then_cut_off_by_the_next_save(tmp_path):
    # Prepare: five saved crops, then a killed writer's half record
    keeper = SampleKeeper(tmp_path, per_class=8, n_classes=2)
    for i in range(5):
        keeper.add(crop(i), i % 2)
    path = tmp_path / LOG_NAME
    good = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(path.read_bytes()[-RECORD:][: RECORD // 2])
    # Execute
    reopened = SampleKeeper(tmp_path, per_class=8, n_classes=2)
    same(keeper, reopened)
    reopened.add(crop(99), 1)
    # Assert: the tail is gone, the new crop follows the good records
    assert path.stat().st_size == good + RECORD
    last = SampleKeeper(tmp_path, per_class=8, n_classes=2)
    assert len(last) == 6 and last.seen.tolist() == [3, 3]
    np.testing.assert_array_equal(last.all()[0][-1], crop(99))


def test_a_corrupt_record_ends_what_is_read(tmp_path):
    keeper = SampleKeeper(tmp_path, per_class=8, n_classes=2)
    for i in range(4):
        keeper.add(crop(i), 0)
    data = bytearray((tmp_path / LOG_NAME).read_bytes())
    data[-5] ^= 0xFF  # bit rot in the last crop
    (tmp_path / LOG_NAME).write_bytes(bytes(data))
    assert len(SampleKeeper(tmp_path, per_class=8, n_classes=2)) == 3


def test_the_log_compacts_itself_and_keeps_the_reservoir(tmp_path):
    keeper = SampleKeeper(tmp_path, per_class=2, n_classes=2)
    for i in range(1000):
        keeper.add(crop(i), i % 2)
    size = (tmp_path / LOG_NAME).stat().st_size
    assert size < 4 * 64 * RECORD + 1024  # bounded, not 1000 records
    assert keeper.seen.tolist() == [500, 500]
    same(keeper, SampleKeeper(tmp_path, per_class=2, n_classes=2))


def test_an_older_samples_npz_is_read_and_migrated_to_the_log(tmp_path):
    # Prepare: what the previous version wrote
    crops = np.stack([crop(i) for i in range(3)])
    buf = io.BytesIO()
    np.savez(buf, crops=crops, labels=np.array([0, 1, 1]), seen=np.array([4, 2], np.int64))
    atomic_write_bytes(tmp_path / LEGACY_NAME, buf.getvalue())
    # Execute
    keeper = SampleKeeper(tmp_path, per_class=8, n_classes=2)
    assert len(keeper) == 3 and keeper.seen.tolist() == [4, 2]
    keeper.migrate()
    # Assert
    assert not (tmp_path / LEGACY_NAME).exists() and (tmp_path / LOG_NAME).exists()
    same(keeper, SampleKeeper(tmp_path, per_class=8, n_classes=2))
    keeper.add(crop(7), 0)
    again = SampleKeeper(tmp_path, per_class=8, n_classes=2)
    assert len(again) == 4 and again.seen.tolist() == [5, 2]


def test_two_keepers_of_one_folder_lose_neither_ones_crops(tmp_path):
    first, second = SampleKeeper(tmp_path, per_class=8, n_classes=2), SampleKeeper(tmp_path, per_class=8, n_classes=2)
    first.add(crop(1), 0)
    second.reload()
    first.add(crop(2), 0)
    second.add(crop(3), 1)  # appended after the record ``second`` had not read
    reader = SampleKeeper(tmp_path, per_class=8, n_classes=2)
    assert reader.seen.tolist() == [2, 1] and len(reader) == 3
    same(second, reader)


def test_a_keeper_whose_log_was_compacted_by_another_offers_its_crop_again(tmp_path):
    first = SampleKeeper(tmp_path, per_class=1, n_classes=1)
    first.add(crop(0), 0)
    stale = SampleKeeper(tmp_path, per_class=1, n_classes=1)
    for i in range(1, 300):  # compacts (a new file) on the way
        first.add(crop(i), 0)
    stale.add(crop(999), 0)
    reader = SampleKeeper(tmp_path, per_class=1, n_classes=1)
    assert reader.seen.tolist() == [301] and len(reader) == 1
    same(stale, reader)
