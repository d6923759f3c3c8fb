"""The install users get: the wheel built from a clean copy of the tree, installed non-editable
into a fresh virtual environment, run from a folder that has nothing of the repository.

The environment reuses this interpreter's installed dependencies through a ``.pth`` line (not
``--system-site-packages``, whose ``.pth`` files would install the checkout's editable finder
again), so each test runs the wheel's code and the wheel's files only. ``.ci/wheel.sh`` does the
same with a really fresh ``pip install WHEEL[edge]``, which also catches a missing dependency.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, source_files
from edge_helpers import face
from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.sync_server.process import free_port

FOLDERS = ("edge_runtime", "export", "sync_server", "fleet_demo")
SCRIPTS = ("infantino-edge", "infantino-server", "infantino-export", "infantino-demo")
RELEASE = REPO / "data" / "models"
DEVICE_FILES = {"manifest.json", "NOTICE.detector", "extractor.int8.onnx", "detector.onnx", "head.npz", "replay_seed.npz"}
BUNDLE = "infantino/edge_runtime/release_model/"
WHEEL_MAX_BYTES = 8 * 1024 * 1024  # code + the device files (4.5 MB, ~3.7 MB zipped); the fp32 extractor alone is 13.8 MB


@pytest.fixture(scope="module")
def venv(built_wheel, tmp_path_factory) -> Path:
    """A fresh environment with the built wheel installed (not editable) and this interpreter's
    dependencies readable behind it."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    "--disable-pip-version-check", str(built_wheel)], check=True, capture_output=True, timeout=300)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "zz_test_dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return root


def _run(venv: Path, *argv: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFANTINO_", "PYTHON"))}
    env.update(HOME=str(cwd / "home"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _away(tmp_path: Path) -> Path:
    """A working folder with nothing of the repository in it (no data/models beside it)."""
    where = tmp_path / "elsewhere"
    (where / "home").mkdir(parents=True)
    return where


def test_the_wheel_holds_every_package_folder_and_module_of_the_tree(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    source = [f for f in source_files() if f.split("/")[0] in FOLDERS and f.endswith(".py")]
    packages = {f.rsplit("/", 1)[0] for f in source if f.endswith("/__init__.py")}
    assert {"edge_runtime/sync", "edge_runtime/watch", "sync_server/db/migrations/versions"} <= packages
    missing = sorted(f for f in source if f"infantino/{f}" not in names)
    assert not missing, f"the wheel lacks {missing}"


def test_the_wheel_bundles_the_release_device_files_with_a_manifest_that_lists_exactly_them(built_wheel):
    release = json.loads((RELEASE / "manifest.json").read_text())
    with zipfile.ZipFile(built_wheel) as whl:
        bundled = {n[len(BUNDLE):]: whl.read(n) for n in whl.namelist() if n.startswith(BUNDLE)}
    assert set(bundled) == DEVICE_FILES  # no fp32 extractor, no classifier.onnx
    manifest = json.loads(bundled["manifest.json"])
    assert manifest["version"] == release["version"] and manifest["input"] == release["input"]
    assert set(manifest["files"]) == {"extractor_int8", "detector", "head", "replay_seed"}
    for role, entry in manifest["files"].items():
        assert entry == release["files"][role]
        assert hashlib.sha256(bundled[entry["path"]]).hexdigest() == entry["sha256"]
    assert manifest["bundle"]["left_out"] == ["classifier", "extractor"]
    assert built_wheel.stat().st_size < WHEEL_MAX_BYTES


def test_each_console_script_starts_from_the_installed_wheel(venv, tmp_path):
    where = _away(tmp_path)
    for script in SCRIPTS:
        r = _run(venv, script, "--help", cwd=where)
        assert r.returncode == 0 and "usage:" in r.stdout, f"{script}: {r.stderr[-1500:]}"
    probe = _run(venv, "python", "-c", "import infantino.edge_runtime.cli as m, infantino.sync_server.cli as s; print(m.__file__, s.__file__)",
                 cwd=where)
    assert probe.returncode == 0, probe.stderr
    assert all(Path(f).is_relative_to(venv) for f in probe.stdout.split()), probe.stdout  # the wheel's code, not the checkout's


def test_an_installed_device_predicts_learns_and_watches_with_no_options(venv, tmp_path):
    # Prepare: photos in a folder that has nothing of the repository
    where = _away(tmp_path)
    (where / "cam").mkdir()
    for i in range(3):
        Image.fromarray(face(i + 1, seed=5)).resize((160, 160)).save(where / "cam" / f"f{i}.jpg")
    # Execute: what a user types after `pip install infantino-edge[edge]`
    pred = _run(venv, "infantino-edge", "predict", "cam/f0.jpg", "--json", cwd=where)
    learn = _run(venv, "infantino-edge", "learn", "cam/f0.jpg", "--label", "happy", cwd=where)
    watch = _run(venv, "infantino-edge", "watch", "cam", "--fast", cwd=where)
    info = _run(venv, "python", "-c", "from infantino.edge_runtime import Device; d = Device(); print(d.package.folder, d.package.version)",
                cwd=where)
    # Assert: the bundled release ran, verified, from inside the installed package
    assert pred.returncode == 0, pred.stderr[-1500:]
    assert json.loads(pred.stdout)[0]["label"] in CLASSES
    assert learn.returncode == 0, learn.stderr[-1500:]
    assert watch.returncode == 0, watch.stderr[-1500:]
    folder, version = info.stdout.split()
    assert Path(folder).is_relative_to(venv) and folder.endswith("release_model")
    assert version == json.loads((RELEASE / "manifest.json").read_text())["version"]
    assert (where / "home" / ".infantino-edge" / "state").is_dir()  # the default state folder, not the checkout


def test_an_installed_server_serves_the_bundled_release_on_first_start(venv, tmp_path):
    where, port = _away(tmp_path), free_port()
    data = where / "server-data"
    token = _run(venv, "infantino-server", "device", "add", "cam-1", "--data-dir", str(data), "--mlflow-uri", "off", cwd=where)
    assert token.returncode == 0, token.stderr[-1500:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFANTINO_", "PYTHON"))}
    env.update(HOME=str(where / "home"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    log = where / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "infantino-server"), "run", "--data-dir", str(data), "--port", str(port),
                                 "--workers", "1", "--mlflow-uri", "off"], cwd=where, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = _model_info(port, token.stdout.strip(), proc, log)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    release = json.loads((RELEASE / "manifest.json").read_text())["version"]
    assert info["package_version"] == release and info["head_version"] == 1
    assert set(info["files"]) - {"global_head", "manifest"} == {"extractor_int8", "detector", "head", "replay_seed"}
    assert "promoted the default package" in log.read_text() and "release_model" in log.read_text()


def _model_info(port: int, token: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> dict:
    """``GET /v1/model`` once the server answers; the server's log when it never does."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/model", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the installed server did not serve a model:\n{log.read_text()[-3000:]}")
