"""``infantino-demo`` end to end at CI size: real server process, real devices, real MLflow."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import REPO, require_data
from edge_helpers import write_image_folder
from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.edge_runtime.core.datasets import image_folders_record, image_set_record
from infantino.fleet_demo.cli import main
from infantino.fleet_demo.data import plan_split, trained_on_held_out
from infantino.fleet_demo.fleet import pick
from infantino.sync_server import store as st
from infantino.sync_server.crops import counts
from infantino.export.tiny_package import build_tiny_package


def test_pick_takes_the_most_uncertain_first_or_a_seeded_random_set():
    u = np.array([0.1, 0.9, 0.5, 0.95, 0.2])
    assert pick(u, 2, "uncertainty", np.random.default_rng(0)).tolist() == [3, 1]
    r = pick(u, 3, "random", np.random.default_rng(0))
    assert len(set(r.tolist())) == 3 and r.tolist() == pick(u, 3, "random", np.random.default_rng(0)).tolist()
    assert len(pick(u, 10, "uncertainty", np.random.default_rng(0))) == 5
    with pytest.raises(ValueError, match="strategy must be one of"):
        pick(u, 1, "loudest", np.random.default_rng(0))


def test_quick_demo_runs_rounds_logs_to_mlflow_publishes_a_refresh_and_cleans_up(tmp_path, tiny_package_dir, monkeypatch):
    images = write_image_folder(tmp_path / "photos", per_class=8, seed=3, classes=CLASSES)
    model = shutil.copytree(tiny_package_dir, tmp_path / "model")
    better = build_tiny_package(tmp_path / "better", version="tiny-better", head_epochs=300)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # a relative --out, as in the README's plain `infantino-demo`
    rc = main(["--quick", "--images", str(images), "--model-dir", str(model), "--out", "out",
               "--refresh-package", str(better), "--refresh-after", "1", "--share-crops"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    recs = summary["arms"]["uncertainty"]
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert [r["labels_spent"] for r in recs] == [0, 6, 12]  # 2 cameras x budget 3 per round
    assert recs[0]["head_version"] < recs[1]["head_version"] < recs[2]["head_version"]  # the server aggregated each round
    assert recs[1]["refreshed"] and recs[1]["gate"]["gate"]["passed"] and recs[2]["package_version"] == "tiny-better"
    assert recs[2]["global_accuracy"] > recs[0]["global_accuracy"]  # the refreshed package is better on the held-out photos
    assert (out / "accuracy_over_rounds.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0
    assert summary["refresh"]["uncertainty"]["promoted"] and summary["refresh"]["uncertainty"]["after_round"] == 1
    assert summary["refresh"]["uncertainty"]["held_out_after"] == recs[1]["global_accuracy"]
    confusion = np.array(summary["final_confusion"]["uncertainty"])
    assert confusion.shape == (len(CLASSES), len(CLASSES)) and confusion.sum() == summary["settings"]["n_test"]
    assert not psutil.Process().children(recursive=True)  # the server and its workers are gone
    (log,) = (out / "uncertainty" / "server").glob("server-*.log")
    with pytest.raises(ConnectionRefusedError, match="refused"), socket.create_connection(("127.0.0.1", int(log.stem.split("-")[1])), timeout=2):
        pass  # and nothing listens on its port any more
    store = st.Store(st.sqlite_url(out / "uncertainty" / "server" / "server.db"))
    assert sum(c["n"] for c in counts(store)) == 12  # the cameras opted in: every labelled crop reached the server
    store.dispose()

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'uncertainty' / 'server' / 'mlflow.db'}")
    rounds = client.search_runs([client.get_experiment_by_name("infantino-federated").experiment_id])
    assert len(rounds) >= 2
    gates = client.search_runs([client.get_experiment_by_name("infantino-gates").experiment_id])
    assert [g.data.tags["decision"] for g in gates] == ["promoted"]


def test_missing_images_is_one_clear_line(tmp_path, capsys):
    assert main(["--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("infantino-demo: error: no image folder") and "\n" not in err


def test_a_killed_demo_stops_its_server_and_workers(tmp_path, tiny_package_dir):
    images = write_image_folder(tmp_path / "photos", per_class=8, seed=4, classes=CLASSES)
    demo = subprocess.Popen([sys.executable, "-m", "infantino.fleet_demo.cli", "--quick", "--no-mlflow", "--images", str(images),
                             "--model-dir", str(tiny_package_dir), "--out", str(tmp_path / "o")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(server := psutil.Process(demo.pid).children(recursive=True)) < 3:  # gunicorn master + 2 workers
            assert demo.poll() is None and time.monotonic() < deadline, "the demo never started its server"
            time.sleep(0.1)
        demo.send_signal(signal.SIGTERM)
        _, err = demo.communicate(timeout=60)
    finally:
        demo.kill()
    assert demo.returncode == 130 and "the server was stopped" in err
    gone, alive = psutil.wait_procs(server, timeout=10)
    assert not alive


def test_out_is_recreated_but_a_foreign_folder_is_never_wiped(tmp_path, tiny_package_dir, capsys):
    images = write_image_folder(tmp_path / "photos", per_class=4, seed=1, classes=CLASSES)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    assert main(["--quick", "--images", str(images), "--out", str(mine), "--model-dir", str(tiny_package_dir)]) == 1
    assert (mine / "thesis.tex").read_text() == "keep me"
    assert "infantino-demo did not write" in capsys.readouterr().err
    assert main(["--quick", "--images", str(images), "--out", str(mine), "--model-dir", str(tmp_path / "no-model")]) == 1
    assert "no-model" in capsys.readouterr().err and (mine / "thesis.tex").exists()  # a bad package is caught first


def _trained_on(package: Path, images) -> Path:
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["trained_on"] = {"images": images}
    (package / "manifest.json").write_text(json.dumps(manifest))  # trained_on is not hashed: the package stays valid
    return package


@pytest.mark.parametrize("recorded", ["digest", "folder path (manifests before digests)"])
def test_a_refresh_package_trained_on_held_out_photos_is_refused(tmp_path, tiny_package_dir, capsys, recorded):
    images = write_image_folder(tmp_path / "photos", per_class=4, seed=2, classes=CLASSES)
    record = image_folders_record([images]) if recorded == "digest" else [str(images)]  # every photo, held-out ones too
    leaky = _trained_on(shutil.copytree(tiny_package_dir, tmp_path / "leaky"), record)
    rc = main(["--quick", "--images", str(images), "--model-dir", str(tiny_package_dir), "--out", str(tmp_path / "o"),
               "--refresh-package", str(leaky), "--refresh-after", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "was trained on" in err and "held-out photos" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_package_trained_only_on_the_camera_streams_passes_the_leak_check(tmp_path, tiny_package_dir):
    images = write_image_folder(tmp_path / "photos", per_class=4, seed=2, classes=CLASSES)
    shards, test = plan_split(images, 2, 0, limit=40)  # the --quick split
    clean = _trained_on(shutil.copytree(tiny_package_dir, tmp_path / "clean"),
                        image_set_record(p for shard in shards for p, _ in shard))
    assert trained_on_held_out(clean, test) == 0
    assert trained_on_held_out(_trained_on(clean, image_set_record([test[0][0]])), test) >= 1


@pytest.mark.slow
def test_real_demo_labels_make_every_camera_better_and_keep_the_fleets_head(tmp_path):
    """The adult-only package on the infant photos, uncertainty-first labelling, default fleet: four
    cameras, each its own class mix (Dirichlet 0.3) and scene (day, night IR, low light, overhead).

    Not the release: its extractor was fine-tuned on the demo's stream photos. Each camera is scored
    on its own held-out frames (60, the same mix and scene); the fleet's head on the balanced
    held-out photos, where skewed cameras must not pull it down by more than noise (3 of 114)."""
    images = require_data("infant")
    out = tmp_path / "demo"
    assert main(["--images", str(images), "--model-dir", str(REPO / "data" / "models-fer-only"), "--out", str(out),
                 "--strategies", "uncertainty"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    recs = summary["arms"]["uncertainty"]
    assert len(recs) == 6 and recs[-1]["labels_spent"] == 4 * 5 * 8
    assert [c["profile"] for c in summary["settings"]["cameras"]] == ["day", "night_ir", "low_light", "overhead"]
    gains = np.subtract(recs[-1]["device_accuracy"], recs[0]["device_accuracy"])
    assert gains.min() >= 0.0 and gains.mean() >= 0.05  # each camera no worse on its own frames, +5 points on average
    assert recs[-1]["global_accuracy"] >= recs[0]["global_accuracy"] - 3 / 114


def test_the_demo_runs_its_own_package_and_refuses_the_release_that_saw_its_held_out_photos(monkeypatch):
    from infantino.fleet_demo.data import demo_model_dir

    images = require_data("infant")
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("INFANTINO_MODEL_DIR", raising=False)
    assert demo_model_dir() == Path("data") / "models-demo"
    _, test = plan_split(images, 4, 0)  # the default split
    assert trained_on_held_out(REPO / "data" / "models-demo", test) == 0
    assert trained_on_held_out(REPO / "data" / "models", test) == len(test)  # the release learned every photo
    monkeypatch.setenv("INFANTINO_MODEL_DIR", "elsewhere")
    assert demo_model_dir() == Path("elsewhere")
