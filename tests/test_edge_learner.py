"""The learning policy alone (``GuardedLearner``: numpy, no ONNX Runtime), and crash recovery as its own step."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from infantino.edge_runtime.config import DeviceConfig
from infantino.edge_runtime.device import Device
from infantino.edge_runtime.core.head import HeadParams, OnlineHead
from infantino.edge_runtime.learner import GuardedLearner
from edge_helpers import FAST, face

DIM, CLASSES = 8, ("a", "b", "c")


def small_head(seed: int = 0) -> OnlineHead:
    rng = np.random.default_rng(seed)
    return OnlineHead.from_arrays([rng.normal(0, 0.3, (DIM, 16)), rng.normal(0, 0.3, (16, len(CLASSES)))],
                                  [np.zeros(16), np.zeros(len(CLASSES))], CLASSES, HeadParams(hidden_layer_sizes=(16,)))


def stream(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable embeddings: class c is centred on axis c."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    x = rng.normal(0, 0.3, (n, DIM)).astype(np.float32)
    x[np.arange(n), y] += 3.0
    return x, y


LEARN_WITHOUT_ORT = """
import sys

class NoOrt:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnxruntime", "onnx", "torch", "flask"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, NoOrt())
import numpy as np
from infantino.edge_runtime.config import DeviceConfig
from infantino.edge_runtime.core.head import HeadParams, OnlineHead
from infantino.edge_runtime.learner import GuardedLearner

rng = np.random.default_rng(0)
head = OnlineHead.from_arrays([rng.normal(0, 0.3, (8, 16)), rng.normal(0, 0.3, (16, 3))], [np.zeros(16), np.zeros(3)],
                              ("a", "b", "c"), HeadParams(hidden_layer_sizes=(16,)))

def stream(n, seed):
    r = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = r.normal(0, 0.3, (n, 8)).astype(np.float32)
    x[np.arange(n), y] += 3.0
    return x, y

learner = GuardedLearner(head, DeviceConfig(learning_rate=0.05))
for xi, yi in zip(*stream(120, 1)):
    learner.learn(xi, int(yi))
tx, ty = stream(60, 2)
acc = float((learner.head.predict_proba(tx).argmax(1) == ty).mean())
loaded = [m for m in ("onnxruntime", "onnx", "torch", "flask", "cv2", "sklearn") if m in sys.modules]
print(learner.counters["labels"], learner.counters["updates"], learner.head.version, round(acc, 3), loaded)
"""


def test_the_learner_learns_in_a_process_without_onnx_runtime():
    # Execute: onnxruntime (and onnx, torch, flask) unimportable, as on a machine without them
    out = subprocess.run([sys.executable, "-c", LEARN_WITHOUT_ORT], capture_output=True, text=True, timeout=120)
    # Assert
    assert out.returncode == 0, out.stderr
    labels, updates, version, acc, loaded = out.stdout.split(maxsplit=4)
    assert int(labels) == 120 and int(updates) > 90 and int(version) == int(updates)
    assert float(acc) >= 0.95 and loaded.strip() == "[]"


def test_the_guard_undoes_an_update_that_wrecks_the_held_back_labels():
    # Prepare: a learner that judges on a holdout of correct labels
    learner = GuardedLearner(small_head(), DeviceConfig(holdout_every=2, holdout_per_class=3, guard_min_holdout=7,
                                                        learning_rate=0.05))
    x, y = stream(60, seed=3)
    for xi, yi in zip(x, y):
        learner.learn(xi, int(yi))
    assert len(learner.holdout) >= 7 and learner.counters["rollbacks"] == 0
    before = [w.copy() for w in learner.head.weights()]
    version, replayed = learner.head.version, len(learner.replay)
    learner.config = replace(learner.config, learning_rate=0.5, learn_steps=30, replay_mix=0, anchor_strength=0.0)
    assert learner.counters["labels"] % 2 == 0  # the next label trains
    # Execute: one mislabel pushed hard
    result = learner.learn(x[0], 2 if y[0] != 2 else 1)
    # Assert
    assert result.rolled_back and not result.updated and result.holdout_loss_after > result.holdout_loss_before
    assert learner.counters["rollbacks"] == 1 and learner.head.version == version and len(learner.replay) == replayed
    for w, b in zip(learner.head.weights(), before):
        np.testing.assert_array_equal(w, b)


def test_a_held_back_label_is_learned_when_a_newer_one_takes_its_place():
    learner = GuardedLearner(small_head(), DeviceConfig(holdout_every=1, holdout_per_class=1))
    x, _ = stream(2, seed=4)
    first = learner.learn(x[0], 0)
    second = learner.learn(x[1], 0)
    assert first.held_out and not first.updated and first.head_version == 0
    assert second.held_out and second.updated and second.head_version == 1
    np.testing.assert_array_equal(learner.holdout.all()[0], x[1:2])
    np.testing.assert_array_equal(learner.replay.all()[0], x[:1])  # the one that left the holdout was learned


def test_adopting_a_head_keeps_the_buffers_and_anchors_learning_to_it():
    learner = GuardedLearner(small_head(0), DeviceConfig(holdout_every=0))
    x, y = stream(12, seed=5)
    for xi, yi in zip(x, y):
        learner.learn(xi, int(yi))
    fleet = small_head(1)
    learner.adopt(fleet)
    assert learner.head is fleet and learner.counters["adopted"] == 1 and len(learner.replay) == 12
    for a, w in zip(learner.anchor_weights, fleet.weights()):
        np.testing.assert_array_equal(a, w)
    with pytest.raises(ValueError, match="does not match"):
        learner.adopt(OnlineHead.from_arrays([np.zeros((DIM, 4)), np.zeros((4, 2))], [np.zeros(4), np.zeros(2)], ("a", "b"),
                                             HeadParams(hidden_layer_sizes=(4,))))


def test_recovery_is_its_own_step_and_learns_a_label_left_by_a_crash_once(tiny_package_dir, tmp_path):
    # Prepare: a frame queued, then its label recorded without being learned (what a crash in between leaves)
    state = tmp_path / "state"
    device = Device(tiny_package_dir, state, replace(FAST, uncertainty_threshold=0.0))
    item = device.predict(face(2, seed=1)).queued_id
    assert item is not None
    device.queue.resolve(item, "fear")
    # Execute: open without recovering, then recover
    opened = Device.open(tiny_package_dir, state, FAST, recover=False)
    assert opened.counters["labels"] == 0 and [i.id for i in opened.queue.resolved()] == [item]
    opened.recover()
    # Assert: learned once, and a second recovery or a reopen does not learn it again
    assert opened.counters["labels"] == 1 and opened.counters["from_queue"] == 1 and not opened.queue.resolved()
    opened.recover()
    again = Device(tiny_package_dir, state, FAST)
    assert opened.counters["labels"] == again.counters["labels"] == 1 and len(again.samples) == 1
