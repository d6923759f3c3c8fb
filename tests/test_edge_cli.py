"""``infantino-edge``: predict, learn, queue, evaluate; one-line errors with a non-zero exit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from edge_helpers import face, png_bytes, tree_digest, write_image_folder

from infantino.edge_runtime.cli import SUBCOMMANDS, main
from infantino.edge_runtime.core.preprocess import CLASSES


@pytest.fixture
def frames(tmp_path):
    paths = []
    for c in (0, 3):
        p = tmp_path / f"frame{c}.png"
        p.write_bytes(png_bytes(face(c)))
        paths.append(p)
    return paths


def _opts(pkg, state):
    return ["--model-dir", str(pkg), "--state-dir", str(state), "--threads", "1", "--no-face-detect"]


def test_predict_json_and_text(tiny_package_dir, tmp_path, frames, capsys):
    assert main(["predict", *map(str, frames), *_opts(tiny_package_dir, tmp_path / "s"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [str(f) for f in frames]
    assert set(out[0]) >= {"label", "probabilities", "uncertainty", "entropy", "margin", "face_found", "queued_id"}
    assert out[0]["label"] in CLASSES
    assert main(["predict", str(frames[0]), *_opts(tiny_package_dir, tmp_path / "s")]) == 0
    assert str(frames[0]) in capsys.readouterr().out


def test_learn_saves_and_queue_lists(tiny_package_dir, tmp_path, frames, capsys):
    state = tmp_path / "s"
    assert main(["learn", str(frames[0]), "--label", "sad", *_opts(tiny_package_dir, state)]) == 0
    assert "head version 1" in capsys.readouterr().out
    assert json.loads((state / "state.json").read_text())["counters"]["labels"] == 1
    assert main(["queue", "--state-dir", str(state)]) == 0
    assert "no frames waiting" in capsys.readouterr().out
    assert main(["predict", str(frames[1]), *_opts(tiny_package_dir, state)]) == 0  # tiny head: unsure of everything
    capsys.readouterr()
    assert main(["queue", "--state-dir", str(state), "--json"]) == 0
    [item] = json.loads(capsys.readouterr().out)
    assert item["source"] == frames[1].name and item["crop"].endswith(".png")


@pytest.mark.parametrize("argv, message", [
    (["learn", "{frame}", "--label", "joyful"], "unknown label 'joyful'"),
    (["predict", "{missing}"], "no such image file"),
    (["predict", "{garbage}"], "not a readable image"),
    (["evaluate", "--test", "{missing}"], "does not exist"),
    (["evaluate"], "give at least one --test"),
])
def test_errors_are_one_line_and_exit_non_zero(tiny_package_dir, tmp_path, frames, capsys, argv, message):
    garbage = tmp_path / "g.jpg"
    garbage.write_bytes(b"not an image")
    fill = {"frame": str(frames[0]), "missing": str(tmp_path / "nope"), "garbage": str(garbage)}
    argv = [a.format(**fill) for a in argv]
    opts = _opts(tiny_package_dir, tmp_path / "s")
    if argv[0] == "evaluate":
        opts = [o for o in opts if o not in ("--state-dir", str(tmp_path / "s"))]
    assert main(argv + opts) == (2 if message.startswith("give ") else 1)  # 2: the command line itself is wrong
    err = capsys.readouterr().err.strip()
    assert err.startswith("infantino-edge: error:") and message in err and "\n" not in err
    assert not (tmp_path / "s" / "state.json").exists()


def test_a_tampered_package_is_refused_by_the_console_script(tiny_package_dir, tmp_path, frames):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package_dir, pkg)
    (pkg / "head.npz").write_bytes((pkg / "head.npz").read_bytes()[:-3] + b"xyz")
    r = subprocess.run([sys.executable, "-m", "infantino.edge_runtime.cli", "predict", str(frames[0]), *_opts(pkg, tmp_path / "s")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "sha256" in r.stderr


def test_evaluate_with_a_stream_reports_before_and_after_and_changes_nothing(tiny_package_dir, tmp_path, capsys):
    stream = write_image_folder(tmp_path / "stream", per_class=12, seed=1, classes=CLASSES)
    test = write_image_folder(tmp_path / "test", per_class=4, seed=2, classes=CLASSES)
    state = tmp_path / "state"
    assert main(["learn", str(next((stream / "sad").iterdir())), "--label", "sad", *_opts(tiny_package_dir, state)]) == 0
    digests = tree_digest(tiny_package_dir), tree_digest(state)
    out_json, plot = tmp_path / "r.json", tmp_path / "curve.png"
    argv = ["evaluate", "--test", str(test), "--crop-test", str(test), "--stream", str(stream), "--model-dir", str(tiny_package_dir),
            "--state-dir", str(state), "--seed", "3", "--no-face-detect", "--threads", "1", "--json", str(out_json), "--plot", str(plot)]
    assert main(argv) == 0
    report = json.loads(out_json.read_text())
    assert (tree_digest(tiny_package_dir), tree_digest(state)) == digests  # a throw-away copy was used
    [t, crops] = report["tests"]
    assert {"path", "n", "accuracy_before", "accuracy_after", "macro_f1_before", "macro_f1_after"} <= set(t)
    assert t["n"] == 28 and t["accuracy_after"] > t["accuracy_before"] + 0.3
    assert crops["face_detect"] is False and crops["accuracy_after"] == t["accuracy_after"]
    assert report["stream"]["n"] == 84 and report["stream"]["path"] == str(stream)
    assert report["predict_ms_p50"] > 0 and report["learn_ms_p50"] > 0
    assert len(report["curve"]) >= 10 and report["curve"][0]["seen"] == 0
    assert len(t["per_class_recall_after"]) == 7
    assert plot.stat().st_size > 0
    assert "->" in capsys.readouterr().out


def test_evaluate_without_a_stream_scores_the_package(tiny_package_dir, tmp_path, capsys):
    test = write_image_folder(tmp_path / "test", per_class=2, seed=2, classes=CLASSES)
    assert main(["evaluate", "--test", str(test), "--model-dir", str(tiny_package_dir), "--no-face-detect",
                 "--json", str(tmp_path / "r.json")]) == 0
    [t] = json.loads((tmp_path / "r.json").read_text())["tests"]
    assert t["n"] == 14 and 0 <= t["accuracy"] <= 1 and "macro_f1" in t


def test_subcommands_are_registered_by_small_functions():
    names = [f.__name__ for f in SUBCOMMANDS]
    assert {"add_predict", "add_learn", "add_queue", "add_evaluate"} <= set(names)
