"""`infantino-edge watch` over videos written in the test: timeline and queue counts, one alert
for a fit of distress (and the hook gets it), SIGTERM and kill -9, a source that cannot be opened."""
from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from infantino.edge_runtime.cli import main
from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.core.metrics import VALENCE_OF_CLASS
from infantino.edge_runtime.core.uncertainty import DEFAULT_THRESHOLD
from watch_helpers import (frame_lines, read_frames, real_photos, records, start_watch, stop, synthetic_frames, wait_for,
                           write_video)

SIZE = (320, 240)


@pytest.fixture()
def package(tiny_package_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_package_dir, tmp_path / "model"))


def test_a_video_of_real_photos_gives_two_timeline_lines_per_second_and_queues_each_new_unsure_face(package, tmp_path):
    # Prepare: 6 real photos and 2 blank grey frames, 1 s each at 10 fps
    photos = real_photos(6, seed=3)
    blank = np.full((240, 320, 3), 128, np.uint8)
    segments = photos[:3] + [blank] + photos[3:] + [blank]
    video = write_video(tmp_path / "nursery.avi", [f for f in segments for _ in range(10)], fps=10, size=SIZE)
    # the oracle: the tiny package's own answer on the frames the watch will sample (first and sixth of each second)
    decoded = read_frames(video)
    oracle = Device(package, tmp_path / "oracle-state", DeviceConfig(threads=1))
    firsts = [oracle.predict(decoded[10 * k], enqueue=False) for k in range(len(segments))]
    expected_queued = sum(p.face_found and p.uncertainty >= DEFAULT_THRESHOLD for p in firsts)
    assert expected_queued >= 3, "the tiny package should find and be unsure about most of these faces"
    # Execute
    state = tmp_path / "state"
    rc = main(["watch", str(video), "--fast", "--fps", "2", "--queue-every", "0.9", "--model-dir", str(package),
               "--state-dir", str(state), "--status-every", "60"])
    # Assert: 16 sampled frames, in order, on the video's clock; no-face frames carry no label
    assert rc == 0
    lines = frame_lines(state)
    assert len(lines) == 2 * len(segments)
    t = np.array([r["t"] for r in lines])
    np.testing.assert_allclose(np.diff(t), 0.5, atol=0.02)
    assert [r["face"] for r in lines[::2]] == [p.face_found for p in firsts]
    assert all("label" not in r for r in lines if not r["face"])
    # the first sample of each unsure face is queued; the second (0.5 s later, same picture) never
    queued = [r for r in lines if r.get("q")]
    assert len(queued) == expected_queued and all(lines.index(r) % 2 == 0 for r in queued)
    assert len(Device(package, state, DeviceConfig(threads=1)).queue) == expected_queued
    minutes = [r for p in (state / "watch").glob("minutes-*.jsonl") for r in records(p)]
    assert sum(m["frames"] for m in minutes) == 16 and sum(m["queued"] for m in minutes) == expected_queued
    assert sum(m["faces"] for m in minutes) == sum(r["face"] for r in lines)


def _negative_and_calm(probe: Device, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic frame the tiny head reads as negative valence once through MJPG, and one it reads as not negative."""
    candidates = synthetic_frames([y for _ in range(6) for y in range(7)], seed=5)
    decoded = read_frames(write_video(tmp_path / "probe.avi", candidates, fps=2, size=(64, 64)))
    valence = [int(VALENCE_OF_CLASS[probe.predict(f, enqueue=False).index]) for f in decoded]
    return candidates[valence.index(0)], candidates[valence.index(1)]


def test_a_fit_of_distress_raises_exactly_one_alert_and_the_hook_receives_it(package, tmp_path):
    # Prepare: 64x64 "faces" the tiny head reads (after MJPG) as negative, and as not negative, at 2 fps
    probe = Device(package, tmp_path / "probe", DeviceConfig(threads=1, detect_faces=False))
    neg, calm = _negative_and_calm(probe, tmp_path)
    fit = [calm if i % 6 == 5 else neg for i in range(2 * 45)]  # 45 s, one calm frame in six: the share flickers
    frames = [calm] * 2 * 10 + fit + [calm] * 2 * 30
    video = write_video(tmp_path / "crying.avi", frames, fps=2, size=(64, 64))
    got = tmp_path / "hook.jsonl"
    hook = f"{sys.executable} -c \"import sys; open({str(got)!r}, 'ab').write(sys.stdin.buffer.read())\""
    state = tmp_path / "state"
    # Execute
    proc = start_watch([str(video), "--fast", "--no-face-detect", "--alert-after", "20", "--alert-clear", "10",
                        "--on-alert", hook, "--model-dir", str(package), "--state-dir", str(state), "--json"])
    out, err = proc.communicate(timeout=120)
    # Assert: one start, one end; the hook got the start; the log and the minute summaries say so
    assert proc.returncode == 0, err
    events = records(state / "watch" / "events.jsonl")
    assert [e["type"] for e in events] == ["distress", "distress_end"]
    start = events[0]
    assert 20 <= start["duration_s"] <= 25 and start["last_expression"] in probe.classes
    hooked = records(got)
    assert len(hooked) == 1 and hooked[0]["type"] == "distress" and hooked[0]["t"] == start["t"]
    assert err.count("DISTRESS") == 1
    json_events = [json.loads(line) for line in out.splitlines() if '"event.' in line]
    assert [e["type"] for e in json_events] == ["event.distress", "event.distress_end"]
    minutes = [r for p in (state / "watch").glob("minutes-*.jsonl") for r in records(p)]
    assert sum(m["alerts"] for m in minutes) == 1


def test_sigterm_finishes_the_frame_saves_and_exits_0_and_kill_9_loses_no_written_line(package, tmp_path):
    video = write_video(tmp_path / "loop.avi", synthetic_frames(range(7), seed=2), fps=7, size=(64, 64))
    state = tmp_path / "state"
    args = [str(video), "--loop", "--fps", "4", "--no-face-detect", "--model-dir", str(package), "--state-dir", str(state),
            "--json", "--status-every", "0.3"]
    # SIGTERM: exit 0, a final status line, the state reopens with the frames counted
    proc = start_watch(args)
    wait_for(lambda: len(frame_lines(state)) >= 6, 60, "six timeline lines")
    rc, out, err = stop(proc, signal.SIGTERM)
    assert rc == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["type"] == "status" and final["frames"] == len(frame_lines(state))
    reopened = Device(package, state, DeviceConfig(threads=1))
    assert reopened.counters["predictions"] == final["frames"]
    # kill -9: every line written before is there and parses; the next run takes over the folder
    proc = start_watch(args)
    wait_for(lambda: len(frame_lines(state)) >= final["frames"] + 6, 60, "six more lines")
    proc.kill()
    out, _ = proc.communicate(timeout=30)
    statuses = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    printed = max((s["frames"] for s in statuses), default=0)
    after_kill = len(frame_lines(state))  # json.loads of every line: a torn one would raise here
    assert after_kill >= final["frames"] + printed
    proc = start_watch(args)
    wait_for(lambda: len(frame_lines(state)) >= after_kill + 2, 60, "the restarted watch")
    rc, out, err = stop(proc, signal.SIGINT)
    assert rc == 0, err


def test_a_source_that_cannot_be_opened_is_one_line_and_exit_1(tmp_path, capsys):
    not_video = tmp_path / "notes.txt"
    not_video.write_text("not a video")
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, message in [(str(tmp_path / "missing.mp4"), "not a camera index"), (str(not_video), "cannot open video file"),
                            (str(empty), "no jpg/jpeg/png/webp/bmp images"), ("rtsp://127.0.0.1:9/none", "cannot open stream")]:
        rc = main(["watch", source, "--open-timeout", "2", "--state-dir", str(tmp_path / "state")])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, (source, err)
    assert not (tmp_path / "state").exists()  # refused before the device or any state was touched
