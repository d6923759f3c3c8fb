"""The watch's pure parts without video: sampling, the one-frame slot, distress hysteresis, the
queue policy, the timeline files (rotation, pruning, torn lines, recovery), backoff, the hook."""
from __future__ import annotations

import json
import random
import sys
import threading
import time

import numpy as np
import pytest

from infantino.edge_runtime.core.backoff import Backoff, jittered
from infantino.edge_runtime.watch.distress import END, START, DistressMonitor, DistressSettings
from infantino.edge_runtime.watch.events import AlertHook, EventLog
from infantino.edge_runtime.watch.jsonl import AppendLog, read_records
from infantino.edge_runtime.queue_policy import QUEUE, QueuePolicy, QueueSettings
from infantino.edge_runtime.watch.sampler import Sampler
from infantino.edge_runtime.watch.slot import LatestSlot
from infantino.edge_runtime.watch.sources import SourceError, parse_source, redact
from infantino.edge_runtime.watch.summary import valence_of
from infantino.edge_runtime.watch.timeline import Timeline, day_of
from infantino.edge_runtime.core.preprocess import CLASSES

DAY = 86400.0
NOON = time.mktime((2026, 3, 10, 12, 0, 0, 0, 0, -1))  # a local noon, far from midnight and DST changes


# --------------------------------------------------------------------------- sampler, slot, backoff


def test_sampling_two_per_second_of_a_25_fps_clock_takes_every_12th_or_13th_frame_without_drift():
    sampler = Sampler(2.0, tolerance_s=0.5 / 25)
    taken = [i for i in range(25 * 60) if sampler.due(i / 25)]
    assert len(taken) == 120
    assert set(np.diff(taken)) <= {12, 13}


def test_sampling_faster_than_the_source_takes_every_frame_and_a_stall_causes_no_burst():
    every = Sampler(1000.0, tolerance_s=0.02)
    assert all(every.due(i / 25) for i in range(50))
    s = Sampler(2.0)
    assert s.due(0.0) and not s.due(0.3)
    assert s.due(10.0)  # after a 10 s stall: one frame, not 20
    assert not s.due(10.2) and s.due(10.5)
    with pytest.raises(ValueError, match="above 0"):
        Sampler(0)


def test_the_slot_keeps_the_newest_frame_and_counts_the_dropped():
    slot: LatestSlot[int] = LatestSlot()
    for i in range(5):
        slot.put(i)
    assert slot.take(0) == 4 and slot.dropped == 4
    assert slot.take(0.01) is None and not slot.finished
    slot.put(9)
    slot.close()
    assert not slot.finished and slot.take() == 9 and slot.finished and slot.take() is None


def test_a_waiting_reader_is_released_by_the_taker_or_by_stop():
    slot: LatestSlot[int] = LatestSlot()
    slot.put(1)
    stop = threading.Event()
    result = []
    t = threading.Thread(target=lambda: result.append(slot.wait_empty(stop)))
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    assert slot.take() == 1
    t.join(2)
    assert result == [True]
    slot.put(2)
    stop.set()
    assert slot.wait_empty(stop) is False


def test_backoff_doubles_to_its_cap_with_jitter_and_resets():
    b = Backoff(base_s=1.0, max_s=8.0, jitter=0.5, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(6)]
    caps = [1, 2, 4, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps)), delays
    b.reset()
    assert b.next_delay() <= 1.0
    spread = [jittered(900, random.Random(i), spread=(0.9, 1.1)) for i in range(50)]
    assert 810 <= min(spread) < max(spread) <= 990
    with pytest.raises(ValueError, match="base_s <= max_s"):
        Backoff(base_s=5, max_s=1)


# --------------------------------------------------------------------------- distress


def _feed(monitor: DistressMonitor, negatives, t0: float = 0.0, fps: float = 2.0):
    events = []
    for i, neg in enumerate(negatives):
        e = monitor.update(t0 + i / fps, neg)
        if e is not None:
            events.append(e)
    return events


def test_sustained_negative_faces_raise_one_alert_and_calm_ends_it():
    m = DistressMonitor(DistressSettings(alert_after_s=60, clear_after_s=30, window_s=10, exit_share=0.3))
    crying = [i % 5 != 4 for i in range(2 * 120)]  # 2 min, every 5th frame not negative
    calm = [False] * (2 * 60)
    events = _feed(m, crying + calm)
    assert [e.kind for e in events] == [START, END]
    start, end = events
    assert 60 <= start.t <= 62 and start.duration_s >= 60
    assert 120 + 30 <= end.t <= 120 + 30 + 10 and not m.active  # + the smoothing window's lag


def test_a_short_fit_raises_nothing_and_a_flickering_share_does_not_flap():
    short = DistressMonitor(DistressSettings(alert_after_s=60, window_s=10, exit_share=0.3))
    assert _feed(short, [True] * 2 * 45 + [False] * 2 * 60) == []
    # share oscillating between 0.4 and 0.7 for 10 minutes, inside the band once the alert is up
    m = DistressMonitor(DistressSettings(alert_after_s=30, clear_after_s=20, window_s=10, exit_share=0.3))
    pattern = ([True] * 14 + [False] * 6) * 6 + ([True] * 8 + [False] * 12) * 54
    events = _feed(m, pattern)
    assert [e.kind for e in events] == [START]


def test_no_face_for_long_ends_an_alert_and_resets_a_rising_one():
    m = DistressMonitor(DistressSettings(alert_after_s=20, clear_after_s=10, window_s=10, exit_share=0.3))
    events = _feed(m, [True] * 2 * 30 + [None] * 2 * 25)  # the window empties after 10 s, then 10 s calm
    assert [e.kind for e in events] == [START, END]
    rising = DistressMonitor(DistressSettings(alert_after_s=20, window_s=10, exit_share=0.3))
    assert _feed(rising, [True] * 2 * 8 + [None] * 2 * 12 + [True] * 2 * 8) == []  # 8 + 8 s, not 20 in a row


def test_distress_settings_refuse_thresholds_that_cannot_hysterese():
    with pytest.raises(ValueError, match="exit_share < enter_share"):
        DistressSettings(enter_share=0.3, exit_share=0.5)


# --------------------------------------------------------------------------- queue policy


def test_the_queue_policy_wants_an_unsure_face_not_too_soon_and_not_the_same_picture():
    p = QueuePolicy(QueueSettings(every_s=10, min_uncertainty=0.7, duplicate_cosine=0.98))
    e1, e2 = np.array([1.0, 0.0, 0.2]), np.array([0.0, 1.0, 0.1])
    assert p.decide(0, False, 0.9, e1) == "no face"
    assert p.decide(0, True, 0.5, e1) == "confident"
    assert p.decide(0, True, 0.9, e1) == QUEUE
    p.queued(0, e1)
    assert p.decide(5, True, 0.9, e2) == "too soon"
    assert p.decide(11, True, 0.9, e1 * 1.01) == "duplicate"
    assert p.decide(11, True, 0.9, e2) == QUEUE
    p.forget_embedding()  # a new extractor: not comparable any more
    assert p.decide(11, True, 0.9, np.ones(16)) == QUEUE


# --------------------------------------------------------------------------- timeline files


def _record(tl: Timeline, t: float, label: str = "sad", face: bool = True, queued=None):
    p = np.full(len(CLASSES), 0.05)
    p[CLASSES.index(label)] = 0.7
    return tl.record(t, face, CLASSES.index(label), p, 0.4, queued)


def test_minute_summaries_give_shares_of_expressions_and_valence(tmp_path):
    tl = Timeline(tmp_path, CLASSES)
    t0 = NOON
    for i, label in enumerate(["sad", "sad", "happy", "neutral"]):
        assert _record(tl, t0 + i, label) is None
    _record(tl, t0 + 5, face=False)
    done = _record(tl, t0 + 61, "happy", queued="0000000000000001-abcdef01")
    assert done["frames"] == 5 and done["faces"] == 4 and done["t"] == int(t0)
    assert done["expressions"]["sad"] == 0.5 and done["expressions"]["happy"] == 0.25
    assert done["valence"] == {"negative": 0.5, "neutral": 0.25, "positive": 0.25}
    tl.close()
    minutes = list(read_records(tmp_path / f"minutes-{day_of(t0)}.jsonl"))
    assert [m.get("partial", False) for m in minutes] == [False, True] and minutes[1]["queued"] == 1
    assert valence_of(("happy", "unknown", "sad")) == (2, 1, 0)


def test_days_rotate_and_old_days_are_deleted(tmp_path):
    tl = Timeline(tmp_path, CLASSES, keep_days=3)
    for d in range(6):
        _record(tl, NOON + d * DAY)
    tl.close()
    kept = sorted(p.name for p in tmp_path.glob("frames-*.jsonl"))
    assert kept == [f"frames-{day_of(NOON + d * DAY)}.jsonl" for d in (3, 4, 5)]
    assert sorted(p.name for p in tmp_path.glob("minutes-*.jsonl")) == [f"minutes-{day_of(NOON + d * DAY)}.jsonl" for d in (3, 4, 5)]


def test_the_oldest_days_go_first_past_the_size_cap(tmp_path):
    tl = Timeline(tmp_path, CLASSES, keep_days=30, max_bytes=60_000)
    for d in range(4):
        for i in range(300):  # ~35 KB a day
            _record(tl, NOON + d * DAY + i)
    tl.close()
    days = sorted(p.name[7:17] for p in tmp_path.glob("frames-*.jsonl"))
    assert day_of(NOON) not in days and days[-1] == day_of(NOON + 3 * DAY)
    # checked when a day begins: the days before today fit the cap, today may add one day's worth
    before_today = sum(p.stat().st_size for p in tmp_path.iterdir() if day_of(NOON + 3 * DAY) not in p.name)
    assert before_today <= 60_000 < sum(p.stat().st_size for p in tmp_path.iterdir())


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_clean(tmp_path):
    path = tmp_path / "x.jsonl"
    log = AppendLog(path)
    log.append({"n": 1})
    log.close()
    with open(path, "ab") as fh:
        fh.write(b'{"n": 2, "half')  # a power cut in the middle of a write
    log = AppendLog(path)
    log.append({"n": 3})
    log.close()
    assert [r["n"] for r in read_records(path)] == [1, 3]


def test_after_a_kill_the_minute_in_progress_is_rebuilt_from_the_frame_lines(tmp_path):
    # Prepare: a timeline that was killed (never closed) in the middle of its second minute
    tl = Timeline(tmp_path, CLASSES)
    for i in range(3):
        _record(tl, NOON + i, "sad")
    for i in range(4):
        _record(tl, NOON + 60 + i, "happy")
    del tl  # no close: no partial summary written
    # Execute: reopen, one more frame in the same minute, then the next minute
    tl = Timeline(tmp_path, CLASSES)
    _record(tl, NOON + 70, "happy")
    done = _record(tl, NOON + 125, "sad")
    tl.close()
    # Assert: minute 2 counts the 4 frames before the kill and the one after
    assert done["t"] == int(NOON + 60) and done["frames"] == 5 and done["valence"]["positive"] == 1.0
    minutes = list(read_records(tmp_path / f"minutes-{day_of(NOON)}.jsonl"))
    assert [m["frames"] for m in minutes] == [3, 5, 1]


def test_a_clean_restart_within_a_minute_replaces_its_partial_summary(tmp_path):
    tl = Timeline(tmp_path, CLASSES)
    _record(tl, NOON, "sad")
    tl.close()  # partial line for NOON's minute
    tl = Timeline(tmp_path, CLASSES)
    _record(tl, NOON + 10, "happy")
    tl.close()
    from infantino.edge_runtime.watch.live import _minutes

    merged = _minutes(tmp_path, NOON - 60, NOON + 120)
    assert len(merged) == 1 and merged[0]["frames"] == 2


# --------------------------------------------------------------------------- events, hook, sources


def test_the_alert_hook_gets_the_event_on_stdin_and_a_hung_one_is_killed(tmp_path):
    out = tmp_path / "got.jsonl"
    hook = AlertHook(f"{sys.executable} -c \"import sys; open({str(out)!r}, 'ab').write(sys.stdin.buffer.read())\"", timeout_s=10)
    hook.fire({"type": "distress", "t": 1.0})
    hook.close(timeout_s=10)
    assert [json.loads(line)["type"] for line in out.read_text().splitlines()] == ["distress"] and hook.ran == 1
    hung = AlertHook(f"{sys.executable} -c \"import time; time.sleep(30)\"", timeout_s=0.5)
    t = time.monotonic()
    hung.fire({"type": "distress"})
    hung.close(timeout_s=10)
    assert hung.failed == 1 and time.monotonic() - t < 8
    with pytest.raises(ValueError, match="needs a command"):
        AlertHook("   ")


def test_events_are_kept_bounded(tmp_path):
    log = EventLog(tmp_path, max_bytes=500)
    for i in range(40):
        log.append({"type": "distress", "t": float(i), "pad": "x" * 30})
    assert (tmp_path / "events.1.jsonl").exists() and (tmp_path / "events.jsonl").stat().st_size <= 600
    assert [e["t"] for e in log.recent(since=38)] == [38.0, 39.0]


def test_source_names_are_understood_or_refused_in_one_line(tmp_path):
    assert parse_source("0").kind == "camera" and parse_source("0").target == 0
    assert parse_source("rtsp://cam.local/stream1").kind == "stream"
    assert parse_source(str(tmp_path)).kind == "folder"
    (tmp_path / "v.mp4").write_bytes(b"")
    assert parse_source(str(tmp_path / "v.mp4")).kind == "file"
    with pytest.raises(SourceError, match="not a camera index"):
        parse_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(SourceError, match="no camera at /dev/video99"):
        parse_source("/dev/video99")
    assert redact("rtsp://admin:secret@10.0.0.9:554/s") == "rtsp://admin:***@10.0.0.9:554/s"


def test_the_watch_imports_no_training_or_server_framework():
    import subprocess

    from conftest import REPO

    probe = ("import infantino.edge_runtime.cli, infantino.edge_runtime.watch.loop, infantino.edge_runtime.watch.cli, infantino.edge_runtime.watch.live, sys, json; "
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not set(json.loads(r.stdout.splitlines()[-1])) & {"torch", "timm", "mlflow", "flask", "matplotlib", "sklearn"}
