"""What a new user meets first: a fresh server that serves the release package, a device that
syncs against it and gets a model, the public Python API, and the data layout."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from edge_helpers import face
from infantino.edge_runtime.core.datasets import DataMissing, fer_file, image_folders_record, image_set_record
from infantino.edge_runtime.core.package import open_package
from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.edge_runtime.sync.transport import Http, SyncError
from server_helpers import ServerProcess, cli

RELEASE = REPO / "data" / "models"


def _edge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infantino.edge_runtime.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=300)


def _frame(path: Path, label: int = 3) -> Path:
    Image.fromarray(face(label, seed=5)).resize((160, 160)).save(path)
    return path


def test_a_fresh_server_serves_the_release_package_and_a_new_device_gets_it(tmp_path, tiny_package_dir):
    # Prepare: an empty data folder and a device that starts on another (tiny) package
    data, state = tmp_path / "server", tmp_path / "device"
    token = cli("device", "add", "cam-fresh", "--data-dir", str(data), "--mlflow-uri", "off").stdout.strip()
    release = open_package(RELEASE).version
    with ServerProcess(data) as server:
        # Execute: the device's first sync against the fresh server
        r = _edge("sync", "--server", server.url, "--token", token, "--state-dir", str(state),
                  "--model-dir", str(tiny_package_dir), "--no-face-detect", "--json")
        log = server.log()
    # Assert: promoted once on the first start, said so, and the device now runs it
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["package_version"] == release and report["package_changed"] and report["head_version"] == 1
    assert f"promoted the default package {release}" in log and "--no-default-package" in log
    current = state / "sync" / "packages" / "current"
    assert open_package(current).version == release  # verified: every file matches its sha256
    pred = _edge("predict", str(_frame(tmp_path / "frame.png")), "--model-dir", str(current), "--state-dir", str(state), "--json")
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)[0]["label"] in CLASSES


def test_a_served_package_is_never_replaced_by_the_default_on_restart(tmp_path, tiny_package_dir):
    data = tmp_path / "server"
    token = cli("device", "add", "cam-r", "--data-dir", str(data), "--mlflow-uri", "off").stdout.strip()
    cli("promote", str(tiny_package_dir), "--data-dir", str(data), "--mlflow-uri", "off")
    with ServerProcess(data) as server:
        info = Http(server.url, token).request("GET", "/v1/model").json()
        log = server.log()
    assert info["package_version"] == open_package(tiny_package_dir).version and info["head_version"] == 1
    assert "promoted the default package" not in log


def test_the_default_package_can_be_turned_off(tmp_path):
    from infantino.sync_server.cli import build_parser, default_package

    data = tmp_path / "server"
    token = cli("device", "add", "cam-off", "--data-dir", str(data), "--mlflow-uri", "off").stdout.strip()
    with ServerProcess(data, env={"INFANTINO_DEFAULT_PACKAGE": "off"}) as server:
        with pytest.raises(SyncError, match="503 no model has been promoted yet"):
            Http(server.url, token, retries=0).request("GET", "/v1/model")
        log = server.log()
    assert "nothing is served yet (default package off)" in log
    assert default_package(build_parser().parse_args(["run", "--no-default-package"])) is None
    assert default_package(build_parser().parse_args(["run"])) == RELEASE


def test_the_public_api_imports_from_the_package_without_heavy_frameworks():
    probe = ("import sys, infantino.edge_runtime; light = 'onnxruntime' not in sys.modules\n"
             "from infantino.edge_runtime import Device, DeviceConfig, Prediction\n"
             "heavy = sorted(m for m in ('torch', 'timm', 'mlflow', 'flask') if m in sys.modules)\n"
             "print(light, Device.__module__, DeviceConfig.__name__, Prediction.__name__, heavy)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "infantino.edge_runtime.device", "DeviceConfig", "Prediction", "[]"]
    with pytest.raises(AttributeError, match="no attribute 'Devise'"):
        import infantino.edge_runtime

        infantino.edge_runtime.Devise  # noqa: B018 - a typo is an AttributeError, not a lazy import


def test_the_readme_python_example_runs_on_the_release_package(tmp_path):
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README has no ```python example"
    (tmp_path / "data").symlink_to(REPO / "data")
    _frame(tmp_path / "frame.jpg")
    r = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(c in r.stdout for c in CLASSES), r.stdout


def test_an_image_set_record_is_content_not_paths(tmp_path):
    from edge_helpers import write_image_folder

    a = write_image_folder(tmp_path / "a", per_class=2, seed=1, classes=CLASSES)
    copy = tmp_path / "elsewhere" / "b"
    for p in sorted(a.rglob("*.png")):  # the same files under another root, listed in another order
        dest = copy / p.parent.name / f"x-{p.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    rec = image_folders_record([a])
    assert rec == image_folders_record([copy]) and rec["count"] == 2 * len(CLASSES)
    assert str(tmp_path) not in json.dumps(rec)
    one_less = image_set_record(sorted(a.rglob("*.png"))[1:])
    assert one_less["count"] == rec["count"] - 1 and one_less["sha256"] != rec["sha256"]


def test_the_release_manifest_records_its_images_as_a_digest_not_a_path():
    images = open_package(RELEASE).manifest.trained_on["images"]
    assert images["count"] == 460 and len(images["sha256"]) == 64 and len(images["file_keys"]) == 457  # 3 photos in two folders
    assert "/" not in json.dumps({k: v for k, v in images.items() if k != "of"})


def test_missing_fer_is_one_line_that_says_where_to_look(tmp_path, monkeypatch):
    monkeypatch.setenv("INFANTINO_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataMissing, match=r"FER2013 .* not found at .*nowhere/fer2013/fer2013_train.npz: see README 'Data'"):
        fer_file()
