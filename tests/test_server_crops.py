"""Consented crop collection against a real server process: opt-in only, stored once, exported, purged."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest

from infantino.edge_runtime.core import wire
from infantino.edge_runtime.consent import CROPS_FORMAT, OUTBOX_NAME
from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.edge_runtime.sync.client import DeviceLearner, Syncer
from infantino.edge_runtime.sync.transport import Http
from infantino.export.data import load_image_folder
from server_helpers import CONFIG, Server, new_device, teach
from infantino.sync_server import cli as server_cli
from infantino.sync_server.crops import counts

SHARING = replace(CONFIG, share_crops=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_package_dir):
    with Server(tmp_path_factory.mktemp("crops-server"), tiny_package_dir) as srv:
        yield srv


def sharing_device(root, package, name: str) -> DeviceLearner:
    from infantino.edge_runtime.device import Device

    plain = new_device(root, package, name)
    return DeviceLearner(Device(plain.device.package.folder, plain.device.state_dir, SHARING))


class RecordingHttp(Http):
    """The real client, remembering which paths it asked for."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.paths: list[str] = []

    def _once(self, method, path, body, headers, max_bytes):
        self.paths.append(f"{method} {path}")
        return super()._once(method, path, body, headers, max_bytes)


def sync_recorded(learner: DeviceLearner, server: Server, name: str):
    http = RecordingHttp(server.url, server.token(name))
    report = Syncer(learner.device.state_dir, learner, http).sync()
    return report, http.paths


def crops_of(server: Server, name: str) -> int:
    return sum(r["n"] for r in counts(server.store) if r["device"] == name)


def test_an_opted_in_device_uploads_its_labelled_crops_once(server, tmp_path, tiny_package_dir):
    dev = sharing_device(tmp_path, tiny_package_dir, "sharer")
    teach(dev, list(range(7)), seed=5)
    assert (dev.device.state_dir / OUTBOX_NAME).exists()
    report, paths = sync_recorded(dev, server, "sharer")
    assert report.error is None and report.crops_sent == 7 and "POST /v1/crops" in paths
    assert not (dev.device.state_dir / OUTBOX_NAME).exists()  # acknowledged crops are forgotten on the device
    assert crops_of(server, "sharer") == 7
    again, paths = sync_recorded(dev, server, "sharer")
    assert again.crops_sent == 0 and "POST /v1/crops" not in paths and crops_of(server, "sharer") == 7

    # exported as an ImageFolder tree that training reads back pixel for pixel
    out = tmp_path / "export"
    assert server_cli.main(["crops", "export", str(out), "--device", "sharer", "--data-dir", str(server.data),
                            "--mlflow-uri", "off"]) == 0
    assert sorted(p.parent.name for p in out.rglob("*.png")) == sorted(CLASSES)
    kept, labels = dev.device.kept_samples()
    faces = load_image_folder(out)
    expected = sorted((int(y), c.tobytes()) for c, y in zip(kept, labels))
    assert sorted((int(y), p.tobytes()) for p, y in zip(faces.pixels, faces.labels)) == expected


def test_crops_never_leave_a_device_that_did_not_opt_in(server, tmp_path, tiny_package_dir):
    dev = new_device(tmp_path, tiny_package_dir, "private")
    teach(dev, [0, 1, 2, 3], seed=6)
    report, paths = sync_recorded(dev, server, "private")
    assert report.error is None and report.crops_sent == 0
    assert not any("/v1/crops" in p for p in paths)
    assert not (dev.device.state_dir / OUTBOX_NAME).exists() and crops_of(server, "private") == 0


def test_withdrawing_consent_deletes_what_was_waiting(server, tmp_path, tiny_package_dir):
    from infantino.edge_runtime.device import Device

    dev = sharing_device(tmp_path, tiny_package_dir, "changes-mind")
    teach(dev, [4, 5, 6], seed=7)
    assert len(dev.device.outbox) == 3
    reopened = DeviceLearner(Device(dev.device.package.folder, dev.device.state_dir, replace(CONFIG, share_crops=False)))
    assert not reopened.device.outbox.shared() and not (reopened.device.state_dir / OUTBOX_NAME).exists()
    # the choice is remembered: a later start without an explicit setting stays private
    assert not Device(dev.device.package.folder, dev.device.state_dir, CONFIG).outbox.shared()
    teach(reopened, [1, 2], seed=8)
    teach(dev, [1, 2], seed=9)  # the device opened before the withdrawal obeys it too
    assert not (reopened.device.state_dir / OUTBOX_NAME).exists()
    report, paths = sync_recorded(reopened, server, "changes-mind")
    assert report.crops_sent == 0 and not any("/v1/crops" in p for p in paths) and crops_of(server, "changes-mind") == 0


def test_withdrawing_with_erase_deletes_the_uploaded_crops_at_the_next_sync(server, tmp_path, tiny_package_dir):
    from infantino.edge_runtime.consent import record_consent

    dev = sharing_device(tmp_path, tiny_package_dir, "erases")
    teach(dev, [0, 3], seed=10)
    assert sync_recorded(dev, server, "erases")[0].crops_sent == 2 and crops_of(server, "erases") == 2
    record_consent(dev.device.state_dir, False, erase=True)
    teach(dev, [5], seed=11)
    report, paths = sync_recorded(dev, server, "erases")
    assert report.error is None and report.crops_erased == 2 and paths.count("DELETE /v1/crops") == 1
    assert "POST /v1/crops" not in paths and crops_of(server, "erases") == 0
    report, paths = sync_recorded(dev, server, "erases")  # confirmed once: not asked again
    assert not any("/v1/crops" in p for p in paths)


def _body(name: str, crops, labels, **meta) -> bytes:
    return wire.encode({"format": CROPS_FORMAT, "device": name, "package_version": "tiny-1", "idempotency_key": "k" * 8, **meta},
                       {"crops": crops, "labels": labels})


def _pickled(name: str) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, meta=np.asarray('{"format": "%s", "device": "%s"}' % (CROPS_FORMAT, name)),
             crops=np.array([{"a": 1}], dtype=object), labels=np.zeros(1, np.int64))
    return buf.getvalue()


@pytest.mark.parametrize("make, status, words", [
    (lambda n: _body(n, np.zeros((2, 64, 64), np.float32), np.zeros(2, np.int64)), 422, "uint8"),
    (lambda n: _body(n, np.zeros((2, 48, 48), np.uint8), np.zeros(2, np.int64)), 422, "shape"),
    (lambda n: _body(n, np.zeros((2, 64, 64), np.uint8), np.array([0, 9])), 422, "class indices"),
    (lambda n: _body(n, np.zeros((2, 64, 64), np.uint8), np.array([-1, 0])), 422, "class indices"),
    (lambda n: _body(n, np.zeros((2, 64, 64), np.uint8), np.zeros(3, np.int64)), 422, "labels must be 2"),
    (lambda n: _body(n, np.zeros((513, 64, 64), np.uint8), np.zeros(513, np.int64)), 422, "1 to 512"),
    (lambda n: _body("someone-else", np.zeros((1, 64, 64), np.uint8), np.zeros(1, np.int64)), 403, "another device"),
    (lambda n: _body(n, np.zeros((1, 64, 64), np.uint8), np.zeros(1, np.int64), format="x"), 400, "meta.format"),
    (_pickled, 400, "pickle"),
    (lambda n: b"not an npz at all", 400, "npz"),
])
def test_hostile_crop_uploads_are_refused_in_one_line(server, make, status, words):
    before = counts(server.store)
    resp = Http(server.url, server.token("hostile"), retries=0).request("POST", "/v1/crops", body=make("hostile"),
                                                                       headers={"Content-Type": wire.CONTENT_TYPE})
    assert resp.status == status and words in resp.reason and "\n" not in resp.reason
    assert counts(server.store) == before


def test_purge_deletes_exactly_one_devices_crops(server, tmp_path, tiny_package_dir, capsys):
    for name, labels in (("purge-a", [0, 1, 2]), ("purge-b", [3, 4])):
        dev = sharing_device(tmp_path, tiny_package_dir, name)
        teach(dev, labels, seed=len(name))
        assert sync_recorded(dev, server, name)[0].crops_sent == len(labels)
    args = ["--data-dir", str(server.data), "--mlflow-uri", "off"]
    capsys.readouterr()
    assert server_cli.main(["crops", "list", "--json", *args]) == 0
    listed = {(r["device"], r["label"]): r["n"] for r in json.loads(capsys.readouterr().out)}
    assert {k: v for k, v in listed.items() if k[0].startswith("purge-")} == {
        ("purge-a", 0): 1, ("purge-a", 1): 1, ("purge-a", 2): 1, ("purge-b", 3): 1, ("purge-b", 4): 1}
    admin = Http(server.url, server.admin).request("GET", "/v1/admin/crops").json()["crops"]
    assert {(r["device"], r["label"]): r["n"] for r in admin} == listed
    assert server_cli.main(["device", "revoke", "purge-a", *args]) == 0  # a revoked device can still be purged
    assert server_cli.main(["device", "purge", "purge-a", *args]) == 0
    assert "deleted 3 crop(s)" in capsys.readouterr().out
    assert crops_of(server, "purge-a") == 0 and crops_of(server, "purge-b") == 2
    assert server_cli.main(["device", "purge", "nobody", *args]) == 1
    # a device may withdraw its own crops
    resp = Http(server.url, server.token("purge-b")).request("DELETE", "/v1/crops")
    assert resp.status == 200 and resp.json()["deleted"] == 2 and crops_of(server, "purge-b") == 0


def test_a_resent_batch_is_stored_once(server):
    crops = np.stack([np.full((64, 64), v, np.uint8) for v in (10, 20, 30)])
    body = _body("resender", crops, np.array([0, 1, 2]))
    http = Http(server.url, server.token("resender"))
    first = http.request("POST", "/v1/crops", body=body, headers={"Content-Type": wire.CONTENT_TYPE}).json()
    second = http.request("POST", "/v1/crops", body=body, headers={"Content-Type": wire.CONTENT_TYPE}).json()
    assert (first["stored"], second["stored"], second["already_known"]) == (3, 0, 3)
    assert crops_of(server, "resender") == 3
