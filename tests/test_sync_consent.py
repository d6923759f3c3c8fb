"""The device's consent switch and crop outbox: off by default, bounded, exact acknowledgements."""
from __future__ import annotations

import numpy as np

from infantino.edge_runtime import cli as edge_cli
from infantino.edge_runtime.consent import LOCK_NAME, OUTBOX_NAME, CropOutbox, erase_pending, record_consent, recorded_consent
from server_helpers import free_port


def crop(v: int, size: int = 64) -> np.ndarray:
    return np.full((size, size), v, np.uint8)


def test_without_consent_nothing_is_written(tmp_path):
    box = CropOutbox(tmp_path)
    assert not recorded_consent(tmp_path) and box.add(crop(1), 0) is False
    assert list(tmp_path.iterdir()) == [] and len(box) == 0


def test_the_outbox_is_bounded_and_drops_the_oldest(tmp_path):
    record_consent(tmp_path, True)
    box = CropOutbox(tmp_path, max_items=5)
    for v in range(8):
        assert box.add(crop(v), v % 7)
    crops, labels, upto = CropOutbox(tmp_path).batch(10)  # a fresh object reads the same file
    assert crops.dtype == np.uint8 and crops.shape == (5, 64, 64)
    assert [int(c[0, 0]) for c in crops] == [3, 4, 5, 6, 7] and labels.tolist() == [3, 4, 5, 6, 0]
    assert box.dropped == 3 and upto == 7


def test_acknowledging_removes_exactly_what_was_sent(tmp_path):
    record_consent(tmp_path, True)
    box = CropOutbox(tmp_path, max_items=4)
    for v in range(3):
        box.add(crop(v), 1)
    _, _, upto = box.batch(2)
    box.add(crop(10), 2)  # labelled while the upload was in flight
    box.add(crop(11), 2)  # pushes the oldest (unsent) crop 0 out: still counted, never double-removed
    box.acknowledge(upto)
    crops, labels, _ = box.batch(10)
    assert [int(c[0, 0]) for c in crops] == [2, 10, 11] and labels.tolist() == [1, 2, 2]
    box.acknowledge(box.batch(10)[2])
    assert len(box) == 0 and not (tmp_path / OUTBOX_NAME).exists()


def test_a_new_input_size_drops_crops_the_server_would_refuse(tmp_path):
    record_consent(tmp_path, True)
    box = CropOutbox(tmp_path)
    box.add(crop(1), 0)
    box.add(crop(2, size=48), 1)
    crops, labels, _ = box.batch(10)
    assert crops.shape == (1, 48, 48) and labels.tolist() == [1] and box.dropped == 1


def test_an_unreadable_outbox_loses_only_unsent_crops(tmp_path):
    record_consent(tmp_path, True)
    (tmp_path / OUTBOX_NAME).write_bytes(b"torn")
    box = CropOutbox(tmp_path)
    assert len(box) == 0 and box.add(crop(5), 3) and box.batch(5)[1].tolist() == [3]


def test_withdrawing_deletes_the_outbox_and_can_ask_for_erasure(tmp_path):
    record_consent(tmp_path, True)
    CropOutbox(tmp_path).add(crop(1), 0)
    record_consent(tmp_path, False)
    assert not (tmp_path / OUTBOX_NAME).exists() and not erase_pending(tmp_path)
    record_consent(tmp_path, False, erase=True)
    assert erase_pending(tmp_path)
    record_consent(tmp_path, False)  # a later plain "off" does not cancel the pending erasure
    assert erase_pending(tmp_path)


def test_the_consent_command(tmp_path, capsys):
    state = str(tmp_path / "state")
    assert edge_cli.main(["consent", "--state-dir", state]) == 0
    assert "share labelled face crops: off; 0 waiting" in capsys.readouterr().out
    assert not (tmp_path / "state" / LOCK_NAME).exists()
    assert edge_cli.main(["consent", "on", "--state-dir", state]) == 0 and recorded_consent(state)
    CropOutbox(state).add(crop(3), 1)
    capsys.readouterr()
    assert edge_cli.main(["consent", "--state-dir", state]) == 0
    assert "on; 1 waiting" in capsys.readouterr().out
    assert edge_cli.main(["consent", "on", "--erase", "--state-dir", state]) == 2  # a wrong command line
    assert "--erase goes with off" in capsys.readouterr().err
    assert edge_cli.main(["consent", "off", "--erase", "--state-dir", state]) == 0
    out = capsys.readouterr().out
    assert "off; 0 waiting" in out and "delete the uploaded ones at the next sync" in out


def test_sync_share_crops_flag_records_the_choice_even_when_the_server_is_away(tmp_path, tiny_package_dir, capsys):
    state = tmp_path / "state"
    base = ["sync", "--server", f"http://127.0.0.1:{free_port()}", "--token", "t", "--model-dir", str(tiny_package_dir),
            "--state-dir", str(state), "--retries", "0", "--timeout", "1"]
    assert edge_cli.main([*base, "--share-crops"]) == 1  # nobody listens: the sync fails in one line ...
    assert "error" in capsys.readouterr().err
    assert recorded_consent(state)  # ... but the owner's choice is kept
    assert edge_cli.main(base) == 1 and recorded_consent(state)  # no flag: as last chosen
    assert edge_cli.main([*base, "--no-share-crops"]) == 1 and not recorded_consent(state)
