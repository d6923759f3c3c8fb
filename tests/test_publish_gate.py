"""Publishing with a gate: real server process, real ONNX Runtime scoring, real MLflow on SQLite."""
from __future__ import annotations

import io
import shutil
import tarfile

import pytest

from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.edge_runtime.sync.client import sync_device
from infantino.edge_runtime.sync.transport import Http
from edge_helpers import write_image_folder
from infantino.export import cli as export_cli
from infantino.export.publish import package_tar, publish
from server_helpers import Server, free_port, new_device, teach
from infantino.sync_server import cli as server_cli
from infantino.sync_server import create_app
from infantino.sync_server.gate import SetScore, decide
from infantino.sync_server.models import promote_package
from infantino.export.tiny_package import build_tiny_package


def s(acc: float, n: int = 42) -> list[SetScore]:
    return [SetScore("held/infant", n, acc, acc)]


@pytest.mark.parametrize("cand, cur, tol, passes", [
    (0.50, 0.45, 0.0, True), (0.45, 0.45, 0.0, True), (0.44, 0.45, 0.0, False), (0.44, 0.45, 0.02, True),
])
def test_decide_keeps_what_is_not_worse(cand, cur, tol, passes):
    passed, reason = decide(s(cand), s(cur), tol)
    assert passed is passes and f"{cand:.4f}" in reason and f"{cur:.4f}" in reason


def test_decide_edge_cases():
    assert decide(s(0.1), [])[0] is True  # nothing served yet
    assert decide([], s(0.5))[0] is False
    assert decide(s(0.0, n=0), s(0.5))[0] is False


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_package_dir):
    root = tmp_path_factory.mktemp("gate")
    held = write_image_folder(root / "held", per_class=6, seed=50, classes=CLASSES)
    good = build_tiny_package(root / "good", version="tiny-good", head_epochs=300)
    bad = build_tiny_package(root / "bad", version="tiny-bad", scramble_labels=True)
    srv = Server(root, tiny_package_dir, mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", env={"INFANTINO_GATE_DIRS": str(held)})
    srv.process.start()
    yield srv, good, bad, root
    srv.close()


def _served(srv: Server) -> tuple[str, int]:
    serving = srv.store.serving()
    return serving.package_version, serving.head_version


def test_the_gate_refuses_a_worse_package_and_promotes_a_better_one(gated, tmp_path, tiny_package_dir, capsys):
    srv, good, bad, root = gated
    before = _served(srv)
    dev = new_device(tmp_path, tiny_package_dir, "fleet")
    assert sync_device(dev, srv.url, srv.token("fleet")).error is None
    teach(dev, [0, 1, 2, 3, 4], seed=3)  # kept samples, re-embedded into the new package's head on adoption

    # better: promoted, and the fleet moves to it on its next sync
    assert export_cli.main(["publish", str(good), "--server", srv.url, "--admin-token", srv.admin]) == 0
    out = capsys.readouterr().out
    assert "gate: passed" in out and "candidate 1.0000" in out and "served" in out
    assert _served(srv)[0] == "tiny-good" != before[0]
    report = sync_device(dev, srv.url, srv.token("fleet"))
    device = dev.device  # the same object, switched in place
    assert report.error is None and report.package_changed and device.package.version == "tiny-good"
    assert report.replayed == 5
    promoted = _served(srv)

    # worse: refused, production untouched, the fleet stays where it is
    status, answer = publish(bad, srv.url, srv.admin)
    gate = answer["gate"]
    assert status == 409 and not answer["promoted"] and not gate["passed"]
    assert gate["candidate"][0]["accuracy"] < gate["current"][0]["accuracy"] == 1.0
    assert _served(srv) == promoted
    assert Http(srv.url, srv.admin).request("GET", "/v1/model").json()["package_version"] == "tiny-good"
    assert export_cli.main(["publish", str(bad), "--server", srv.url, "--admin-token", srv.admin]) == 1
    assert "not promoted; production unchanged" in capsys.readouterr().out
    report = sync_device(device, srv.url, srv.token("fleet"))
    assert report.error is None and not report.package_changed and device.package.version == "tiny-good"

    # every decision is an MLflow run holding both packages' numbers
    assert srv.flush_tracking()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("infantino-gates").experiment_id])
    decisions = sorted(r.data.tags["decision"] for r in runs)
    assert decisions == ["promoted", "refused", "refused"]
    refused = next(r for r in runs if r.data.tags["decision"] == "refused")
    m = refused.data.metrics
    assert m["candidate_accuracy"] == m["candidate_accuracy.held"] == gate["candidate"][0]["accuracy"]
    assert m["current_accuracy"] == m["current_accuracy.held"] == 1.0 and m["candidate_n"] == 42
    assert refused.data.params["candidate_version"] == "tiny-bad" and refused.data.params["current_version"] == "tiny-good"
    assert refused.data.tags["gate"] == "failed" and "worse than" in refused.data.tags["reason"]


def test_a_package_larger_than_the_update_limit_reaches_the_publish_check(gated):
    """Packages are tens of MB: the 4 MB limit of device uploads must not apply to them."""
    srv = gated[0]
    resp = Http(srv.url, srv.admin, retries=0).request("POST", "/v1/admin/packages", body=_tar({"extractor.onnx": b"0" * (6 << 20)}),
                                                        headers={"Content-Type": "application/x-tar"})
    assert resp.status == 422 and "manifest" in resp.reason


@pytest.fixture()
def ungated(tmp_path, tiny_package_dir):
    app = create_app({"DATA_DIR": str(tmp_path / "srv"), "MLFLOW_URI": "off", "BACKGROUND": False,
                      "MAX_PACKAGE_BYTES": 1 << 20})
    state = app.extensions["infantino"]
    promote_package(state.store, state.data_dir, tiny_package_dir)
    token = state.store.rotate_admin()
    yield app.test_client(), {"Authorization": f"Bearer {token}"}, state
    state.close()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_without_a_held_out_set_only_force_replaces_the_served_package(ungated, tmp_path):
    client, auth, state = ungated
    pkg = build_tiny_package(tmp_path / "p", version="tiny-unjudged", seed=3)
    resp = client.post("/v1/admin/packages", data=package_tar(pkg), headers=auth)
    assert resp.status_code == 409 and "no held-out set" in resp.json["error"]
    assert state.store.serving().package_version == "tiny-1"
    resp = client.post("/v1/admin/packages?force=true", data=package_tar(pkg), headers=auth)
    assert resp.status_code == 200 and resp.json["promoted"] and state.store.serving().package_version == "tiny-unjudged"


def test_hostile_package_uploads_are_refused(ungated, tmp_path, tiny_package_dir):
    client, auth, state = ungated
    tampered = shutil.copytree(tiny_package_dir, tmp_path / "tampered")
    (tampered / "head.npz").write_bytes((tampered / "head.npz").read_bytes() + b"x")
    files = {p.name: p.read_bytes() for p in tampered.iterdir()}
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    cases = [
        (_tar(files), 422, "sha256"),
        (_tar({"../manifest.json": b"{}"}), 400, "plain file name"),
        (_tar({"sub/extractor.onnx": b"x"}), 400, "plain file name"),
        (link.getvalue(), 400, "plain file name"),
        (_tar({f"f{i}": b"x" for i in range(20)}), 400, "1 to 16 files"),
        (b"definitely not a tar", 400, "tar"),
        (_tar({"extractor.onnx": b"x"}), 422, "manifest"),
        (_tar({"extractor.onnx": b"x" * (2 << 20)}), 413, "too large"),
    ]
    for body, status, words in cases:
        resp = client.post("/v1/admin/packages?force=true", data=body, headers=auth)
        assert resp.status_code == status and words in resp.json["error"], (words, resp.json)
    assert state.store.serving().package_version == "tiny-1"
    assert not any((state.data_dir / "staging").iterdir())  # nothing left behind
    assert client.post("/v1/admin/packages", data=_tar(files)).status_code == 401  # admin only


def test_promote_with_a_gate_dir_uses_the_same_gate_locally(ungated, tmp_path, capsys):
    _, _, state = ungated
    held = write_image_folder(tmp_path / "held", per_class=3, seed=51, classes=CLASSES)
    good = build_tiny_package(tmp_path / "good", version="tiny-good-local", head_epochs=300)
    bad = build_tiny_package(tmp_path / "bad", version="tiny-bad-local", scramble_labels=True)
    args = ["--data-dir", str(state.data_dir), "--mlflow-uri", "off"]
    assert server_cli.main(["promote", str(good), "--gate-dir", str(held), *args]) == 0
    assert state.store.serving().package_version == "tiny-good-local"
    capsys.readouterr()
    assert server_cli.main(["promote", str(bad), "--gate-dir", str(held), *args]) == 1
    err = capsys.readouterr().err
    assert "gate refused package tiny-bad-local" in err and "worse than the served" in err and "production unchanged" in err
    assert state.store.serving().package_version == "tiny-good-local"
    # a generous tolerance lets it through, and that decision is kept too
    assert server_cli.main(["promote", str(bad), "--gate-dir", str(held), "--tolerance", "1.0", *args]) == 0
    assert state.store.serving().package_version == "tiny-bad-local"


def test_publish_exits_2_without_a_token_and_1_when_it_fails(tmp_path, tiny_package_dir, capsys, monkeypatch):
    monkeypatch.delenv("INFANTINO_ADMIN_TOKEN", raising=False)
    assert export_cli.main(["publish", str(tiny_package_dir), "--server", "http://127.0.0.1:9"]) == 2
    assert "INFANTINO_ADMIN_TOKEN" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert export_cli.main(["publish", str(tiny_package_dir), "--server", dead, "--admin-token", "t"]) == 1
    assert "error" in capsys.readouterr().err
    broken = shutil.copytree(tiny_package_dir, tmp_path / "broken")
    (broken / "head.npz").write_bytes(b"tampered")
    assert export_cli.main(["publish", str(broken), "--server", dead, "--admin-token", "t"]) == 1  # checked before sending
    assert "sha256" in capsys.readouterr().err
