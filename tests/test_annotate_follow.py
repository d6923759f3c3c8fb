"""The annotation page follows a package another process installed: the device switches in place."""
from __future__ import annotations

import pytest

pytest.importorskip("flask")

from edge_helpers import face, open_device

from infantino.edge_runtime.annotate import create_app
from infantino.edge_runtime.sync.state import SyncState, managed_model_dir
from infantino.export.tiny_package import build_tiny_package


def test_the_page_runs_the_package_sync_installed_from_another_process(tiny_package_dir, tmp_path):
    # Prepare: the page's device on tiny-1 with one queued frame
    state = tmp_path / "state"
    page_device = open_device(tiny_package_dir, state, uncertainty_threshold=0.0)
    item = page_device.predict(face(1, seed=1)).queued_id
    client = create_app(page_device).test_client()
    page = client.get("/").get_data(as_text=True)
    csrf = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    # Execute: another process installs tiny-2 (as sync does) and learns a label on it
    sync_state = SyncState(state)
    sync_state.swap_package(build_tiny_package(sync_state.root / "packages" / "tiny-2", version="tiny-2", seed=7))
    other = open_device(managed_model_dir(state), state)
    other.learn(face(2, seed=2), "fear")
    data = client.get("/api/state").get_json()
    labelled = client.post("/api/label", json={"id": item, "label": "happy"}, headers={"X-CSRF-Token": csrf})
    # Assert: the same device object now runs tiny-2, with the other process's label, and learns on it
    assert data["status"]["package_version"] == "tiny-2" and page_device.package.version == "tiny-2"
    assert data["status"]["counters"]["labels"] == 1 and [i["id"] for i in data["items"]] == [item]
    assert labelled.status_code == 200, labelled.get_json()
    assert labelled.get_json()["status"]["counters"]["labels"] == 2 and labelled.get_json()["status"]["package_version"] == "tiny-2"
    assert open_device(managed_model_dir(state), state).counters["labels"] == 2
