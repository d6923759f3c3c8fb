"""The camera's own part (``personal``): EM prior, bias, guard, frame pool, state; numpy only."""
from __future__ import annotations

import numpy as np
import pytest

from infantino.edge_runtime import camera
from infantino.edge_runtime.core import personal
from infantino.edge_runtime.config import DeviceConfig
from infantino.edge_runtime.core.head import HeadParams, OnlineHead
from infantino.edge_runtime.learner import GuardedLearner

K, DIM = 4, 6
CLASSES = ("a", "b", "c", "d")


def world(n: int, mix: np.ndarray, seed: int, spread: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping class clusters (a head gets ~60-70 % on balanced data), classes drawn by ``mix``."""
    rng = np.random.default_rng(seed)
    y = rng.choice(K, size=n, p=mix)
    x = rng.normal(0, spread, (n, DIM)).astype(np.float32)
    x[np.arange(n), y] += 2.0
    return x, y


@pytest.fixture(scope="module")
def head() -> OnlineHead:
    x, y = world(2000, np.full(K, 1 / K), 0)
    return OnlineHead.fit(x, y, HeadParams(hidden_layer_sizes=(16,)), max_iter=200, classes=CLASSES)


def camera_gain(head: OnlineHead, mix: np.ndarray, n_labels: int, seed: int) -> float:
    """Points over the head on the camera's own future frames after ``n_labels`` random labels of 240 frames."""
    frames, fy = world(240, mix, seed)
    test, ty = world(600, mix, seed + 1000)
    cam = camera.CameraModel(K, DIM)
    learner_kept: tuple[list, list] = ([], [])
    for x in frames:
        cam.observe(x, head.predict_proba(x[None])[0])
    for i in np.random.default_rng(seed).permutation(240)[:n_labels]:
        learner_kept[0].append(frames[i])
        learner_kept[1].append(fy[i])
        cam.labelled(frames[i], int(fy[i]), head, lambda: (np.array(learner_kept[0]), np.array(learner_kept[1])))
    before = (head.predict_proba(test).argmax(1) == ty).mean()
    after = (cam.apply(head.predict_proba(test), test).argmax(1) == ty).mean()
    return float(after - before)


def test_em_recovers_a_cameras_class_mix_from_unlabelled_frames(head):
    mix = np.array([0.7, 0.1, 0.1, 0.1])
    frames, _ = world(3000, mix, 3)
    prior = personal.em_prior(head.predict_proba(frames), np.zeros(K), np.full(K, 1 / K), 0.0, 200)
    assert abs(prior[0] - 0.7) < 0.08 and prior.argmax() == 0
    # labels count as known frames: the same answer from the labels alone
    counts = np.array([70.0, 10, 10, 10])
    assert np.allclose(personal.em_prior(np.zeros((0, K)), counts, np.full(K, 1 / K), 0.0), mix)


def test_a_skewed_camera_gets_better_and_a_uniform_one_no_worse(head):
    skewed = [camera_gain(head, np.array([0.75, 0.05, 0.15, 0.05]), 30, s) for s in range(4)]
    uniform = [camera_gain(head, np.full(K, 1 / K), 30, s) for s in range(4)]
    assert np.mean(skewed) > 0.05 and min(skewed) > 0.0
    assert np.mean(uniform) > -0.01 and min(uniform) > -0.05  # a personal head can cost one camera a few points (docs/personalization.md)


def test_the_guard_takes_only_a_candidate_that_beats_the_shared_head():
    shared, prior, bias, flat = (0.60, 1.00), (0.58, 1.10), (0.65, 0.90), (0.55, 0.80)
    assert personal.pick([shared, prior, bias, bias], "accuracy") == 2  # a tie keeps the simpler (earlier) candidate
    assert personal.pick([shared, prior, bias], "log_loss") == 2
    # a flatter candidate: lower log-loss, fewer labels right; "both" refuses it, "log_loss" does not
    assert personal.pick([shared, prior, bias, flat], "both") == 2 and personal.pick([shared, flat], "log_loss") == 1
    assert personal.pick([shared, (0.5, 2.0), (0.6, 1.2)], "accuracy") == 0 and personal.pick([shared, (0.5, 2.0)], "both") == 0


def test_labels_that_carry_nothing_of_the_camera_do_not_make_it_worse(head):
    x, y = world(300, np.full(K, 1 / K), 7)
    test, ty = world(600, np.full(K, 1 / K), 8)
    noise = np.random.default_rng(7).integers(0, K, 40)  # labels drawn independently of the frames
    a = personal.choose(head.predict_proba(x[40:]), head.predict_proba(x[:40]), noise, np.full(K, 1 / K))  # the device default
    before = (head.predict_proba(test).argmax(1) == ty).mean()
    after = (a.apply(head.predict_proba(test), np.full(K, 1 / K), test).argmax(1) == ty).mean()
    assert after >= before - 0.02


def test_too_few_labels_leave_the_shared_head_alone(head):
    x, y = world(5, np.array([1.0, 0, 0, 0]), 1)
    assert personal.choose(head.predict_proba(x), head.predict_proba(x), y, np.full(K, 1 / K)).level == "shared"


def test_bias_fit_recovers_a_constant_logit_offset():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (4000, K))
    shift = np.array([1.0, -0.5, 0.0, -0.5])
    p = np.exp(logits + shift)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(K, p=row) for row in p])
    b = personal.fit_bias(logits - np.log(np.exp(logits).sum(1, keepdims=True)), y, 1e-4, steps=12)
    assert np.allclose(b, shift - shift.mean(), atol=0.12)


def test_the_frame_pool_is_a_ring_that_forgets_labelled_frames():
    pool = camera.FramePool(2, size=3, n_classes=2)
    for v in range(5):
        pool.add(np.array([v, v], np.float32), np.array([0.5, 0.5]))
    assert sorted(pool.all()[:, 0]) == [2, 3, 4]
    assert pool.discard(np.array([3, 3], np.float32)) and not pool.discard(np.array([3, 3], np.float32))
    assert sorted(pool.all()[:, 0]) == [2, 4]
    pool.add(np.array([9, 9], np.float32), np.array([0.1, 0.9]))
    pool.add(np.array([8, 8], np.float32), np.array([0.2, 0.8]))  # full again: the oldest (2) goes
    assert sorted(pool.all()[:, 0]) == [4, 8, 9]
    again = camera.FramePool.from_arrays(pool.to_arrays(), 2, 3, 2)
    assert np.allclose(again.probs()[-1], [0.2, 0.8])
    again.add(np.array([7, 7], np.float32), np.array([0.5, 0.5]))  # the reloaded pool keeps the age order: 4 is the oldest
    assert sorted(again.all()[:, 0]) == [7, 8, 9]


def test_camera_state_round_trips_and_refuses_arrays_that_do_not_fit(head):
    cam = camera.CameraModel(K, DIM)
    x, y = world(60, np.array([0.7, 0.1, 0.1, 0.1]), 2)
    for xi in x:
        cam.observe(xi, head.predict_proba(xi[None])[0])
    for i in range(30):
        cam.labelled(x[i], int(y[i]), head, lambda: (x[: i + 1], y[: i + 1]))
    again = camera.CameraModel(K, DIM)
    again.load_arrays(cam.to_arrays())
    assert again.adaptation.level == cam.adaptation.level and np.array_equal(again.counts, cam.counts)
    assert np.allclose(again.apply(head.predict_proba(x), x), cam.apply(head.predict_proba(x), x), atol=1e-5)
    bad = dict(cam.to_arrays(), personal_prior=np.array([np.nan, 1, 1, 1]))
    with pytest.raises(ValueError, match="personal arrays do not fit"):
        camera.CameraModel(K, DIM).load_arrays(bad)
    with pytest.raises(ValueError, match="pool arrays do not fit"):
        camera.CameraModel(K, DIM).load_arrays(dict(cam.to_arrays(), pool_x=np.zeros((3, DIM + 1), np.float16)))


def test_the_learner_predicts_with_the_fleets_head_and_the_cameras_part(head):
    learner = GuardedLearner(head.copy(), DeviceConfig(seed=0))
    x, y = world(200, np.array([0.85, 0.05, 0.05, 0.05]), 4)
    for xi in x:
        learner.observe(xi)
    for xi, yi in zip(x[:40], y[:40]):
        learner.learn(xi, int(yi))
    assert learner.camera.n_labels == 40 and learner.camera.adaptation.level != "shared"
    shared = learner.predicting_head.predict_proba(x)
    assert np.allclose(shared, head.predict_proba(x), atol=1e-6)  # the fleet's head as adopted, not the local copy
    assert learner.predict_proba(x)[:, 0].mean() > shared[:, 0].mean()  # the camera's mix leans to class a
    # a new fleet head: the camera's part stays
    learner.adopt(head.copy())
    assert learner.camera.n_labels == 40 and learner.camera.adaptation.level != "shared"
    off = GuardedLearner(head.copy(), DeviceConfig(personalize=False))
    assert np.allclose(off.predict_proba(x), head.predict_proba(x), atol=1e-6)


def test_a_device_keeps_its_cameras_part_across_a_restart_and_a_new_package(tiny_package_dir, tmp_path):
    """Through the real ``Device`` on the tiny package: a camera whose baby is mostly "sad" learns that mix,
    the state snapshot keeps it, and a new package version takes the counts and the mix along."""
    import shutil

    from infantino.edge_runtime.core.package import Manifest, read_manifest, write_manifest
    from infantino.export.tiny_package import synthetic_face
    from edge_helpers import open_device

    rng = np.random.default_rng(0)
    labels = [4] * 34 + [3] * 3 + [6] * 3  # mostly sad
    dev = open_device(tiny_package_dir, tmp_path / "state")
    frames = [synthetic_face(c, rng) for c in labels]
    preds = dev.predict_batch(frames, enqueue=False)
    assert len(dev.learner.camera.pool) == len(frames)  # every frame with a face is evidence of the mix
    for p, c in zip(preds, labels):
        dev.learn(p, dev.classes[c], save=False)
    dev.save()
    cam = dev.status()["camera"]
    assert sum(cam["labels"].values()) == 40 and cam["labels"]["sad"] == 34 and cam["frames"] == 0  # labelled frames left the pool
    assert cam["level"] != "shared" and max(cam["prior"], key=cam["prior"].get) == "sad"
    again = open_device(tiny_package_dir, tmp_path / "state")
    assert again.status()["camera"] == cam
    probe = [synthetic_face(c, np.random.default_rng(99)) for c in range(7)]
    np.testing.assert_allclose([p.probabilities for p in again.predict_batch(probe, enqueue=False)],
                               [p.probabilities for p in dev.predict_batch(probe, enqueue=False)], atol=1e-5)
    pkg = tmp_path / "pkg2"
    shutil.copytree(tiny_package_dir, pkg)
    write_manifest(pkg, Manifest(**{**read_manifest(pkg).__dict__, "version": "tiny-2"}))
    kept = again.kept_embeddings(pkg)
    again.switch_package(pkg, replay=kept)
    moved = again.status()["camera"]
    assert moved["labels"] == cam["labels"] and max(moved["prior"], key=moved["prior"].get) == "sad"
