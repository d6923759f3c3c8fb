"""The annotation queue: bounded, URL-safe ids, and a frame labelled twice counts once."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from infantino.edge_runtime.annotation_queue import ID_PATTERN, AnnotationQueue, QueueError


def _add(q: AnnotationQueue, key: str | None = None, value: int = 0) -> str | None:
    crop = np.full((64, 64), value, np.uint8)
    return q.add(crop, predicted="sad", uncertainty=0.8, probabilities=[1 / 7] * 7, face_found=True, source="cam", frame_key=key)


def test_add_list_and_read_back_the_crop(tmp_path):
    q = AnnotationQueue(tmp_path / "queue")
    item_id = _add(q, "00ff00ff", value=77)
    assert ID_PATTERN.match(item_id) and item_id.endswith("-00ff00ff")
    [item] = q.items()
    assert item.id == item_id and item.predicted == "sad" and item.label is None
    np.testing.assert_array_equal(q.crop(item_id), np.full((64, 64), 77, np.uint8))
    assert q.crop_path(item_id).suffix == ".png"


def test_the_same_frame_is_queued_once(tmp_path):
    q = AnnotationQueue(tmp_path)
    assert _add(q, "abcdef12") is not None
    assert _add(q, "abcdef12") is None
    assert len(q) == 1


def test_the_queue_is_bounded_and_drops_the_oldest(tmp_path):
    q = AnnotationQueue(tmp_path, max_items=3)
    ids = [_add(q) for _ in range(5)]
    assert [i.id for i in q.items()] == ids[2:]
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_resolve_counts_the_first_label_only(tmp_path):
    q = AnnotationQueue(tmp_path)
    item_id = _add(q)
    assert q.resolve(item_id, "happy") == ("happy", True)
    assert q.resolve(item_id, "angry") == ("happy", False)
    assert q.items() == [] and [i.id for i in q.resolved()] == [item_id]
    q.remove(item_id, keep_label=True)  # learned: the frame goes, its label stays as a tombstone
    assert q.resolve(item_id, "sad") == ("happy", False)
    assert q.resolved() == [] and not q.crop_path(item_id).exists()


def test_concurrent_labels_of_one_frame_count_once(tmp_path):
    q = AnnotationQueue(tmp_path)
    item_id = _add(q)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def label(name: str) -> None:
        barrier.wait()
        results.append(q.resolve(item_id, name)[1])

    threads = [threading.Thread(target=label, args=(n,)) for n in ["happy", "sad", "fear", "angry"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("bad", ["../../etc/passwd", "x", "0123456789abcdef-0000000g", "", "0123456789ABCDEF-00000000"])
def test_malformed_ids_are_refused(tmp_path, bad):
    q = AnnotationQueue(tmp_path)
    with pytest.raises(QueueError, match="malformed"):
        q.resolve(bad, "happy")


def test_unknown_id_and_unknown_label_change_nothing(tmp_path):
    q = AnnotationQueue(tmp_path)
    item_id = _add(q)
    with pytest.raises(QueueError, match="no queued frame"):
        q.resolve("0000000000000000-00000000", "happy")
    with pytest.raises(QueueError, match="unknown label"):
        q.resolve(item_id, "joyful")
    assert [i.id for i in q.items()] == [item_id]


def test_remove_deletes_every_file_and_tombstones_are_bounded(tmp_path):
    q = AnnotationQueue(tmp_path, max_items=2)
    item_id = _add(q)
    q.resolve(item_id, "sad")
    q.remove(item_id)
    assert list(tmp_path.iterdir()) == []
    for _ in range(4):
        i = _add(q)
        q.resolve(i, "sad")
        q.remove(i, keep_label=True)
    assert len(list(tmp_path.glob("*.label"))) == 2
