"""bench/distress_timelines.py and bench/distress_alerts.py: the vectorised monitor gives DistressMonitor's events,
the scoring counts what it says, the timelines hold what they promise, and the --quick run writes its numbers."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from conftest import REPO, require_data

from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.edge_runtime.watch.distress import END, START, DistressSettings, frame_negative

sys.path.insert(0, str(REPO / "bench"))
from distress_timelines import (NO_FACE, FastMonitor, FrameTable, TimelineSpec, camera_frames, choose,  # noqa: E402
                                make_timeline, monitor_events, score_day)

FPS = 2.0


def _t(n: int) -> np.ndarray:
    return np.arange(n) / FPS


def _random_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Runs of mostly-negative, mostly-calm and no-face frames, so that the thresholds are crossed often."""
    out, have = [], 0
    while have < n:
        length = int(rng.integers(1, 200))
        p_neg, p_none = rng.choice([0.05, 0.4, 0.7, 0.95]), rng.choice([0.0, 0.05, 0.6])
        run = np.where(rng.random(length) < p_neg, 1, 0)
        run[rng.random(length) < p_none] = NO_FACE
        out.append(run)
        have += length
    return np.concatenate(out)[:n].astype(np.int8)


def _random_settings(rng: np.random.Generator) -> DistressSettings:
    enter = float(rng.choice([0.4, 0.5, 0.6, 0.8, 1.0]))
    return DistressSettings(alert_after_s=float(rng.choice([0, 5, 12.5, 30, 60])), clear_after_s=float(rng.choice([0, 5, 30])),
                            window_s=float(rng.choice([0.5, 3, 10, 17])), enter_share=enter,
                            exit_share=float(rng.choice([0.0, 0.2, 0.35])), min_faces=int(rng.integers(1, 6)))


def test_the_vectorised_monitor_gives_exactly_the_monitors_events():
    events, busy = 0, 0
    for seed in range(40):
        # Prepare: a random sequence and random settings (zero delays, a one-frame window, an epoch-sized clock)
        rng = np.random.default_rng(seed)
        codes, s = _random_codes(rng, 4000), _random_settings(rng)
        t = _t(len(codes)) + (0.1 if seed % 2 else 1.7e9)
        # Execute
        ref = monitor_events(t, codes, s)
        fast = FastMonitor(t, codes).events(s)
        # Assert: identical kinds, times, onsets and shares
        assert fast == ref, f"seed {seed}: {s}"
        events, busy = events + len(ref), busy + (len(ref) >= 4)
    assert events > 200 and busy >= 20  # the sequences do exercise the machine


def test_an_obvious_fit_of_distress_is_one_alert_and_a_calm_day_none():
    s = DistressSettings(alert_after_s=30, clear_after_s=30, window_s=10)
    calm = np.zeros(int(600 * FPS), np.int8)
    fit = np.ones(int(120 * FPS), np.int8)
    codes = np.concatenate([calm, fit, calm])
    events = FastMonitor(_t(len(codes)), codes).events(s)
    assert [e.kind for e in events] == [START, END]
    assert 600 + 30 <= events[0].t <= 600 + 30 + 10  # the share needs 0.6 of the window first
    quiet = np.where(np.random.default_rng(1).random(int(3600 * FPS)) < 0.2, 1, 0).astype(np.int8)  # 20 % misread frames
    assert FastMonitor(_t(len(quiet)), quiet).events(s) == []


def test_the_defaults_catch_a_minute_of_crying_and_let_a_short_fuss_pass():
    calm = [0] * int(300 * FPS)
    minute = [0 if i % 5 == 4 else 1 for i in range(int(60 * FPS))]  # every 5th frame read as calm
    for fit, alerts in ((minute, 1), ([1] * int(20 * FPS), 0)):
        codes = np.array(calm + fit + calm, np.int8)
        starts = [e for e in monitor_events(_t(len(codes)), codes, DistressSettings()) if e.kind == START]
        assert len(starts) == alerts
        assert all(300 < e.t < 300 + 90 for e in starts)


def test_scoring_counts_hits_time_to_alert_late_alerts_and_false_ones():
    episodes = np.array([[100.0, 160.0], [500.0, 530.0], [900.0, 1200.0]])
    starts = np.array([20.0, 140.0, 150.0, 535.0, 2000.0])  # false, hit, repeat, 5 s late, false
    got = score_day(starts, episodes, grace_s=0.0, lag_s=10.0)
    assert got["detected"].tolist() == [True, False, False] and got["during"].tolist() == [True, False, False]
    np.testing.assert_allclose(got["tta"][0], 40.0)
    assert np.isnan(got["tta"][1:]).all() and got["false"] == 2 and got["extra"] == 2
    lenient = score_day(starts, episodes, grace_s=10.0, lag_s=10.0)
    assert lenient["detected"].tolist() == [True, True, False] and lenient["tta"][1] == 35.0 and lenient["false"] == 2
    none = score_day(np.array([]), episodes, 0.0, 10.0)
    assert not none["detected"].any() and none["false"] == 0


def test_a_day_long_timeline_has_its_episodes_negative_and_the_rest_calm():
    calm_ids, neg_ids = np.array([3, 4, 5]), np.array([7, 8])
    spec = TimelineSpec(seconds=6 * 3600)
    tl = make_timeline(calm_ids, neg_ids, spec, 4, True, np.random.default_rng(0))
    assert len(tl.photo) == 6 * 3600 * 2 and set(np.unique(tl.variant)) == {0, 1, 2, 3}
    dur = tl.episodes[:, 1] - tl.episodes[:, 0]
    assert len(dur) >= 8 and dur.min() >= 30 - 0.5 and dur.max() <= 300 + 0.5
    inside = np.zeros(len(tl.photo), bool)
    for s, e in tl.episodes:
        inside[int(s * 2):int(e * 2)] = True
    face = tl.photo >= 0
    assert set(tl.photo[inside & face]) <= set(neg_ids) and set(tl.photo[~inside & face]) <= set(calm_ids)
    assert 0.02 < 1 - face.mean() < 0.1  # some frames with no face
    same = np.flatnonzero(tl.photo[1:] == tl.photo[:-1])
    assert np.mean(tl.variant[same + 1] != tl.variant[same]) > 0.5  # a held photo is not one frozen frame
    quiet = make_timeline(calm_ids, neg_ids, spec, 4, False, np.random.default_rng(0))
    assert len(quiet.episodes) == 0 and set(quiet.photo[quiet.photo >= 0]) <= set(calm_ids)


def test_frame_codes_follow_the_watch_loops_own_negative_flag():
    probs = np.zeros((2, 3, len(CLASSES)), np.float32)
    probs[0, :, CLASSES.index("sad")] = 1
    probs[1, :, CLASSES.index("happy")] = 1
    found = np.array([[True, False, True], [True, True, True]])
    codes = FrameTable(probs, found).codes()
    assert codes.tolist() == [[1, NO_FACE, 1], [0, 0, 0]]
    assert frame_negative(CLASSES, CLASSES.index("fear"), True) is True
    assert frame_negative(CLASSES, CLASSES.index("surprise"), True) is False and frame_negative(CLASSES, 0, False) is None


def test_camera_frames_start_with_the_photo_and_vary_lightly():
    rgb = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    frames = camera_frames(rgb, 4, (0, 7))
    assert frames[0] is rgb and len(frames) == 4
    assert all(f.dtype == np.uint8 and f.shape[0] >= 112 and f.shape[1] >= 150 for f in frames[1:])
    assert all(np.array_equal(a, b) for a, b in zip(frames, camera_frames(rgb, 4, (0, 7))))  # seeded
    assert not np.array_equal(frames[1], frames[2])


def test_the_rule_keeps_every_fold_in_the_false_alert_budget_then_takes_recall_then_speed():
    def row(recall: float, fa_worst: float, tta: float) -> dict:
        return {"recall_60": recall, "false_per_calm_day": fa_worst / 2, "worst_fold_false_per_calm_day": fa_worst,
                "tta_median_60": tta}

    a, b, c, d = (DistressSettings(alert_after_s=v) for v in (10, 30, 45, 50))
    rows = [(a, row(0.99, 3.0, 20)), (b, row(0.95, 0.4, 70)), (c, row(0.945, 0.2, 55)), (d, row(0.90, 0.0, 40))]
    assert choose(rows, 0.5)[0] == c  # within 0.01 of the best recall in budget: the faster one
    assert choose(rows, 0.5, tolerance=0.0)[0] == b
    assert choose(rows, 5.0)[0] == a
    assert choose(rows, 0.1)[0] == d


def test_quick_bench_scores_ours_and_the_peer_on_the_same_timelines(tmp_path):
    require_data("infant")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "distress_alerts.py"), "--quick", "--out", str(out),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["table"]) == {"ours", "peer"} and summary["protocol"]["test_folds"] == [0, 1]
    for rows in summary["table"].values():
        old, chosen = rows["old defaults"], rows["chosen (ours' rule)"]
        assert old["episodes"] == chosen["episodes"] > 0  # the same timelines for every row
        for r in rows.values():
            assert 0 <= r["recall_all"] <= 1 and r["false_per_calm_day"] >= 0
    assert summary["table"]["ours"]["old defaults"]["episodes"] == summary["table"]["peer"]["old defaults"]["episodes"]
    checks = summary["checks"]
    assert all(c["device_max_abs_prob_diff"] < 1e-4 for c in checks["folds"].values()) and checks["reference_monitor_events"] >= 0
    assert (out / "distress_timeline.png").stat().st_size > 0 and (out / "distress_settings.png").stat().st_size > 0
