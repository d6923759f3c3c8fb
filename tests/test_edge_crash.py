"""kill -9 while the device learns and saves, again and again: the state always reopens valid."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from conftest import REPO, TESTS
from edge_helpers import open_device

LEARNER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from edge_helpers import open_device

    device = open_device({package!r}, {state!r}, holdout_every=3, holdout_per_class=2)
    rng = np.random.default_rng(int(sys.argv[1]))
    while True:
        y = int(rng.integers(0, 7))
        device.learn((rng.normal(size=16) + y).astype(np.float32), y)  # saves a snapshot every time
        print(device.generation, device.counters["labels"], flush=True)
""")


def _check_state(package, state) -> tuple[int, int]:
    device = open_device(package, state, holdout_every=3, holdout_per_class=2)
    c = device.counters
    assert all(np.all(np.isfinite(w)) for w in device.head.weights())
    assert device.head.version == c["updates"]
    assert int(device.replay.seen.sum()) == c["updates"]  # every accepted update entered the replay
    assert c["labels"] == c["updates"] + c["rollbacks"] + len(device.holdout)
    return device.generation, c["labels"]


def test_kill_9_during_learn_and_save_never_breaks_the_state(tiny_package_dir, tmp_path):
    state = tmp_path / "state"
    script = tmp_path / "learner.py"
    script.write_text(LEARNER.format(tests=str(TESTS), package=str(tiny_package_dir), state=str(state)))
    rng = np.random.default_rng(0)
    last_generation, last_labels = 0, 0
    for round_ in range(10):
        # land anywhere in the next learn + save
        line = _learn_then_kill(script, int(rng.integers(2, 12)), rng, args=(str(round_),), max_pause_s=0.01)
        reported = tuple(int(v) for v in line.split())
        generation, labels = _check_state(tiny_package_dir, state)
        # Nothing that was reported saved is lost, and learning continues from where it was.
        assert generation >= reported[0] > last_generation
        assert labels >= reported[1] > last_labels
        last_generation, last_labels = generation, labels
    device = open_device(tiny_package_dir, state)
    device.save()
    assert not list(state.glob("*.tmp")) and not list(state.glob(".*.tmp"))


CONSENTING_LEARNER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from edge_helpers import face, open_device

    device = open_device({package!r}, {state!r}, share_crops=True)
    while True:
        i = device.counters["labels"]  # the frame's number is written into its first pixels
        y = i % 7
        frame = face(y, seed=i)
        frame[0, :4] = np.frombuffer(np.uint32(i).tobytes(), np.uint8)
        device.learn(frame, y)  # saves a snapshot, and with consent queues the crop for upload
        print(device.generation, device.counters["labels"], flush=True)
""")


def _frame_numbers(state) -> list[int]:
    """Which frames' crops wait in the consent outbox (their number is in the first four pixels)."""
    from infantino.edge_runtime.consent import CropOutbox

    crops, _, _ = CropOutbox(state).batch(10_000)
    return _numbers(crops)


def _numbers(crops) -> list[int]:
    """The frame numbers written into the first four pixels of numbered frames."""
    return [int(np.frombuffer(np.ascontiguousarray(c[0, :4]).tobytes(), np.uint32)[0]) for c in crops]


def _numbered_learner(tmp_path, template: str, package) -> tuple:
    """(state folder, script) of a learner of numbered frames from ``template``."""
    state, script = tmp_path / "state", tmp_path / "learner.py"
    script.write_text(template.format(tests=str(TESTS), package=str(package), state=str(state)))
    return state, script


def _kill_when_the_outbox_changes(proc: subprocess.Popen, outbox) -> None:
    """SIGKILL the moment a new crop lands in the outbox (an atomic replace: a new inode)."""
    before = outbox.stat().st_ino if outbox.exists() else None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if outbox.stat().st_ino != before:
                break
        except FileNotFoundError:
            pass
    proc.send_signal(signal.SIGKILL)


def _learn_then_kill(script, lines: int, rng: np.random.Generator, kill=None, *, args: tuple = (),
                     max_pause_s: float = 0.02) -> str:
    """Run a learner script until it reported ``lines`` saves, then SIGKILL it: by ``kill(proc)``, or
    after a random pause of up to ``max_pause_s`` (anywhere in the next learn and save). Its last line."""
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(lines):
            line = proc.stdout.readline()
            assert line, f"learner died: {proc.stderr.read()[-2000:]}"
        if kill is not None:
            kill(proc)
        else:
            time.sleep(float(rng.uniform(0, max_pause_s)))
            proc.send_signal(signal.SIGKILL)
        return line
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_kill_9_never_leaves_a_crop_queued_whose_label_the_state_lost(tiny_package_dir, tmp_path):
    # Prepare: a device with consent that learns numbered frames
    state, script = _numbered_learner(tmp_path, CONSENTING_LEARNER, tiny_package_dir)
    rng = np.random.default_rng(1)
    for round_ in range(8):
        # Execute: kill right as a crop is queued (odd rounds), or anywhere in a learn (even rounds)
        kill = (lambda proc: _kill_when_the_outbox_changes(proc, state / "consent_outbox.npz")) if round_ % 2 else None
        _learn_then_kill(script, int(rng.integers(1, 4)), rng, kill)
        # Assert: every queued crop belongs to a label the state holds, each at most once
        labels = open_device(tiny_package_dir, state).counters["labels"]
        numbers = _frame_numbers(state)
        assert numbers and max(numbers) < labels, (round_, numbers[-3:], labels)
        assert len(numbers) == len(set(numbers))


KEEPING_LEARNER = CONSENTING_LEARNER.replace("share_crops=True", "replay_per_class=4")


def _kept_numbers(device) -> list[int]:
    return _numbers(device.kept_samples()[0])


def test_kill_9_while_kept_crops_are_appended_never_breaks_the_samples_log(tiny_package_dir, tmp_path):
    # Prepare: numbered frames learned (each save appends its crop to samples.log), reservoirs of 4 per class
    state, script = _numbered_learner(tmp_path, KEEPING_LEARNER, tiny_package_dir)
    rng = np.random.default_rng(2)
    for round_ in range(8):
        _learn_then_kill(script, int(rng.integers(2, 10)), rng)  # Execute: kill anywhere in a learn, snapshot or append
        # Assert: the log reads back, holds only crops of labels the state has, each once, at most 4 per class
        device = open_device(tiny_package_dir, state, replay_per_class=4)
        numbers = _kept_numbers(device)
        labels = device.counters["labels"]
        assert numbers and max(numbers) < labels and len(numbers) == len(set(numbers)), (round_, numbers, labels)
        assert np.bincount(device.kept_samples()[1], minlength=7).max() <= 4
        assert int(device.samples.seen.sum()) <= labels
    # and the next save appends after whatever tail the last kill left
    frame = np.array(device.kept_samples()[0][0])
    frame[0, :4] = np.frombuffer(np.uint32(labels).tobytes(), np.uint8)
    seen = int(device.samples.seen.sum())
    result = device.learn(frame, 0)
    assert result.updated or result.held_out
    reopened = open_device(tiny_package_dir, state, replay_per_class=4)
    assert int(reopened.samples.seen.sum()) == seen + 1 and sorted(_kept_numbers(reopened)) == sorted(_kept_numbers(device))
