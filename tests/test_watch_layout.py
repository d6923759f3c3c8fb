"""A package with another class layout arrives while the camera watches (issue 21).

Sync switches the ``Device`` in place; the watch's timeline took the class list once and went
on naming frames by the old layout. Here a real ``Watch`` runs over a looping video in a
thread, the test switches its device to a package whose classes are in reverse order, as the
sync worker does, and every frame line and minute summary must name the class the predicting
package meant.
"""
from __future__ import annotations

import io
import threading

import numpy as np

from edge_helpers import open_device
from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.edge_runtime.watch.loop import Watch, WatchSettings
from infantino.edge_runtime.watch.sources import open_source, parse_source
from infantino.edge_runtime.watch.timeline import Timeline
from infantino.export.tiny_package import build_tiny_package
from watch_helpers import frame_lines, records, synthetic_frames, wait_for, write_video

REVERSED = tuple(reversed(CLASSES))


def _layouts(line: dict) -> set[tuple[str, ...]]:
    """The class layouts under which the line's label is the top of its probabilities (ties: none)."""
    p = np.asarray(line["p"])
    top = np.sort(p)[-2:]
    if top[1] == top[0]:
        return {CLASSES, REVERSED}  # rounded to a tie: says nothing
    return {layout for layout in (CLASSES, REVERSED) if layout[int(np.argmax(p))] == line["label"]}


def test_a_package_with_other_classes_mid_watch_names_frames_by_the_package_that_predicted_them(tiny_package_dir, tmp_path):
    # Prepare: a camera on the tiny package watching a looping video; a package with the classes reversed
    other = build_tiny_package(tmp_path / "reversed", version="tiny-reversed", classes=REVERSED)
    video = write_video(tmp_path / "cam.avi", synthetic_frames([i % 7 for i in range(14)], seed=2), fps=10, size=(64, 64))
    state = tmp_path / "state"
    device = open_device(tiny_package_dir, state)
    watch = Watch(device, open_source(parse_source(str(video))), WatchSettings(fps=10, fast=True, loop=True, status_every_s=60),
                  out=io.StringIO())
    result: list = []
    thread = threading.Thread(target=lambda: result.append(watch.run()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: watch.board.frames >= 10, 60, "frames on the first package")
        # Execute: what the sync worker does when the server serves another package
        device.switch_package(other)
        switched_at = watch.board.frames
        wait_for(lambda: watch.swaps == 1 and watch.board.frames >= switched_at + 40, 60, "frames on the new package")
    finally:
        watch.stop.set()
        thread.join(60)
    assert result == [0]
    # Assert: the lines name by the old layout up to the switch and by the new one after it
    lines = [r for r in frame_lines(state) if r.get("face")]
    fits = [_layouts(r) for r in lines]
    split = next(k for k in range(len(fits) + 1)
                 if all(CLASSES in f for f in fits[:k]) and all(REVERSED in f for f in fits[k:]))
    assert len(lines) - split >= 15 and any(f == {REVERSED} for f in fits[split:]), "no frame told the layouts apart"
    # and each minute counts the frames by the names their lines carry
    minutes = {m["t"]: m for p in sorted((state / "watch").glob("minutes-*.jsonl")) for m in records(p)}
    for t, minute in minutes.items():
        mine = [r["label"] for r in lines if t <= r["t"] < t + 60]
        assert minute["faces"] == len(mine)
        for name, share in minute["expressions"].items():
            assert round(mine.count(name) / max(len(mine), 1), 3) == share, (name, minute)


def test_the_timeline_counts_a_minute_across_two_layouts_by_name(tmp_path):
    tl = Timeline(tmp_path, CLASSES)
    p = np.full(7, 0.1)
    p[0] = 0.4
    tl.record(600.0, True, 0, p, 0.5)  # "angry" in the first layout
    tl.switch_classes(REVERSED)
    tl.record(601.0, True, 0, p, 0.5)  # index 0 is "neutral" now
    tl.record(602.0, True, 6, p, 0.5, classes=CLASSES)  # a frame the old package predicted, recorded late
    done = tl.record(661.0, False, 0, p, 0.5)
    tl.close()
    assert [r["label"] for r in frame_lines_of(tmp_path)[:3]] == ["angry", "neutral", "neutral"]
    assert done["expressions"]["angry"] == round(1 / 3, 3) and done["expressions"]["neutral"] == round(2 / 3, 3)
    assert done["valence"]["negative"] == round(1 / 3, 3) and done["valence"]["neutral"] == round(2 / 3, 3)


def frame_lines_of(folder) -> list[dict]:
    return [r for p in sorted(folder.glob("frames-*.jsonl")) for r in records(p)]


def test_the_watch_queues_by_the_device_s_threshold_unless_it_names_its_own(tiny_package_dir, tmp_path):
    from infantino.edge_runtime.queue_policy import QueueSettings

    video = write_video(tmp_path / "cam.avi", synthetic_frames([1, 2], seed=3), fps=10, size=(64, 64))
    device = open_device(tiny_package_dir, tmp_path / "state", uncertainty_threshold=0.35)
    plain = Watch(device, open_source(parse_source(str(video))), WatchSettings(), out=io.StringIO())
    own = Watch(device, open_source(parse_source(str(video))), WatchSettings(queue=QueueSettings(min_uncertainty=0.9)),
                out=io.StringIO())
    assert plain.policy.settings.min_uncertainty == 0.35 and own.policy.settings.min_uncertainty == 0.9
    assert plain.policy.decide(0.0, True, 0.4, None) == "queue" and own.policy.decide(0.0, True, 0.4, None) == "confident"
