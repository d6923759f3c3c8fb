"""End to end, what the server aggregates is what the devices learned: real server process,
real devices on the tiny package, nothing but public entry points between them.

Each round here has one device in it, so the server's step is that device's voice exactly
(one voice: the median clip bound is its own norm, the trimmed mean of one row is the row,
``server_lr`` is 1): ``new global head - base = discount(tau) * (device head - base)``, with
``discount(tau) = 1 / sqrt(1 + tau)`` for the default strategy (``sync_server/aggregate.py``).
"""
from __future__ import annotations

import json
import shutil
import urllib.request

import numpy as np
import pytest

from infantino.edge_runtime.device import Device
from infantino.edge_runtime.core.head import OnlineHead
from infantino.edge_runtime.sync.client import sync_device
from infantino.export.tiny_package import synthetic_face
from server_helpers import CONFIG, Server

ATOL = 2e-6  # float32 weights on the wire and in the store; a learned step is ~1e-3 per weight


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_package_dir):
    with Server(tmp_path_factory.mktemp("wiring"), tiny_package_dir) as srv:
        yield srv


@pytest.fixture()
def open_device(tmp_path, tiny_package_dir):
    def make(name: str) -> Device:
        model = tmp_path / f"{name}-model"
        shutil.copytree(tiny_package_dir, model)
        return Device(model, tmp_path / f"{name}-state", CONFIG)

    return make


def _get(server: Server, path: str) -> bytes:
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {server.admin}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def served_version(server: Server) -> int:
    return int(json.loads(_get(server, "/v1/admin/status"))["serving"]["head_version"])


def global_head(server: Server, version: int) -> list[np.ndarray]:
    """Global head ``version`` as the server serves it to devices."""
    head = OnlineHead.from_bytes(_get(server, f"/v1/model/files/global-head-{version}.npz"))
    assert head.version == version
    return [np.asarray(w, np.float64) for w in head.weights()]


def joined(server: Server, device: Device, name: str) -> int:
    """Sync a fresh device once (it adopts the served head); returns the version it is based on."""
    report = sync_device(device, server.url, server.token(name))
    assert report.error is None and report.head_changed, report
    return report.head_version


def teach(device: Device, labels, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    for y in labels:
        device.learn(synthetic_face(int(y), rng), int(y))
    return [np.asarray(w, np.float32).astype(np.float64) for w in device.head.weights()]


def pushed(server: Server, device: Device, name: str) -> None:
    report = sync_device(device, server.url, server.token(name))
    assert report.error is None and report.pushed == 1 and not report.rejected, report


def aggregated(server: Server, name: str) -> int:
    result = server.aggregate()
    assert result["aggregated"] and result["served"] and result["devices"] == [name], result
    return int(result["head_version"])


def minus(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [x - y for x, y in zip(a, b)]


def assert_step(old: list[np.ndarray], new: list[np.ndarray], learned: list[np.ndarray], weight: float) -> None:
    """The server's step ``new - old`` equals ``weight`` times the device's delta ``learned``, element by element."""
    assert max(float(np.abs(d).max()) for d in learned) > 100 * ATOL, "the device did not learn anything to compare"
    for i, (step, d) in enumerate(zip(minus(new, old), learned)):
        np.testing.assert_allclose(step, weight * d, rtol=1e-4, atol=ATOL, err_msg=f"layer {i}")


def test_the_aggregated_step_is_exactly_the_delta_the_device_learned(server, open_device):
    # Prepare: a device on the served head learns three labels
    device = open_device("wire-delta")
    base_version = joined(server, device, "wire-delta")
    base = global_head(server, base_version)
    learned = teach(device, [0, 3, 5], seed=11)
    # Execute: its update goes up and is the only one in the round
    pushed(server, device, "wire-delta")
    new_version = aggregated(server, "wire-delta")
    # Assert: the new global head moved by the device's head minus its base, not a part of it
    assert new_version > base_version
    assert_step(base, global_head(server, new_version), minus(learned, base), 1.0)


def test_a_device_with_exactly_one_new_label_uploads_it(server, open_device):
    # Prepare
    device = open_device("wire-one")
    base_version = joined(server, device, "wire-one")
    base = global_head(server, base_version)
    learned = teach(device, [4], seed=12)
    # Execute
    pushed(server, device, "wire-one")
    new_version = aggregated(server, "wire-one")
    # Assert
    assert_step(base, global_head(server, new_version), minus(learned, base), 1.0)


def test_an_update_from_an_older_base_is_discounted_by_its_staleness(server, open_device):
    # Prepare: two devices join on the same head and learn as much as each other
    early, late = open_device("wire-early"), open_device("wire-late")
    base_version = joined(server, early, "wire-early")
    assert joined(server, late, "wire-late") == base_version
    base = global_head(server, base_version)
    teach(early, [1, 2, 6], seed=13)
    late_learned = teach(late, [2, 1, 6], seed=14)
    pushed(server, early, "wire-early")
    between = aggregated(server, "wire-early")  # the served head moves on: "late" is now one version behind
    # Execute: the update based on the older head arrives and is aggregated on the newer one
    pushed(server, late, "wire-late")
    newest = aggregated(server, "wire-late")
    # Assert: the step is late's delta from its own base, times 1 / sqrt(1 + tau) with tau = 1
    tau = between - base_version
    assert tau == 1
    assert_step(global_head(server, between), global_head(server, newest), minus(late_learned, base), 1 / np.sqrt(1 + tau))
