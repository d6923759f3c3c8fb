"""``infantino-demo`` end to end at CI size: real server process, real devices, real MLflow."""
from __future__ import annotations

import json
import shutil

import numpy as np
import psutil
import pytest

from edge_helpers import write_image_folder
from edge_runtime.preprocess import CLASSES
from fleet_demo.cli import main
from fleet_demo.fleet import pick
from sync_server import store as st
from sync_server.crops import counts
from tiny_package import build_tiny_package


def test_pick_takes_the_most_uncertain_first_or_a_seeded_random_set():
    u = np.array([0.1, 0.9, 0.5, 0.95, 0.2])
    assert pick(u, 2, "uncertainty", np.random.default_rng(0)).tolist() == [3, 1]
    r = pick(u, 3, "random", np.random.default_rng(0))
    assert len(set(r.tolist())) == 3 and r.tolist() == pick(u, 3, "random", np.random.default_rng(0)).tolist()
    assert len(pick(u, 10, "uncertainty", np.random.default_rng(0))) == 5
    with pytest.raises(ValueError):
        pick(u, 1, "loudest", np.random.default_rng(0))


def test_quick_demo_runs_rounds_logs_to_mlflow_publishes_a_refresh_and_cleans_up(tmp_path, tiny_package_dir):
    images = write_image_folder(tmp_path / "photos", per_class=8, seed=3, classes=CLASSES)
    model = shutil.copytree(tiny_package_dir, tmp_path / "model")
    better = build_tiny_package(tmp_path / "better", version="tiny-better", head_epochs=300)
    out = tmp_path / "out"
    rc = main(["--quick", "--images", str(images), "--model-dir", str(model), "--out", str(out),
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
    assert not psutil.Process().children(recursive=True)  # the server and its workers are gone
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
    assert main(["--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infantino-demo: error: no image folder") and "\n" not in err
