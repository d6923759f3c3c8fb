"""One fleet, round by round: devices predict their frames, a caregiver labels a budget of
them, devices learn and sync, the server aggregates, devices pull the new global head.

Cameras differ as real ones do (``cameras.plan_cameras``): each films its own babies (a
disjoint shard of the photos) in its own class mix and scene (day, night IR, low light,
overhead, low-res JPEG). Each round reports every camera's accuracy on its own held-out
frames (the device's whole predictor: the shared head and the camera's own adaptation)
beside the global head on the balanced held-out photos.

Everything is real: ``Device`` objects (ONNX Runtime, the MLP head, replay, guard) on
their own state folders, a ``infantino-server run`` child process (gunicorn, SQLite,
MLflow), HTTP sync. Only the caregiver is simulated: the photo's folder is the label.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from infantino.edge_runtime.device import Device, DeviceConfig
from infantino.edge_runtime.evaluate import embed_items
from infantino.edge_runtime.core.head import OnlineHead
from infantino.edge_runtime.core.metrics import summarize
from infantino.edge_runtime.core.preprocess import ImageError
from infantino.edge_runtime.sync.client import sync_device
from infantino.edge_runtime.sync.transport import Http
from infantino.sync_server.process import LocalServer

from .cameras import Camera, frame

DEVICE_CONFIG = DeviceConfig(threads=1, cache_size=256, autosave=False)
STRATEGIES = ("uncertainty", "random")


@dataclass
class FleetPlan:
    """What to simulate: one ``Camera`` per device (its stream, mix, profile, own held-out frames),
    and the balanced held-out photos ``test`` the global head is scored on."""

    package: Path
    cameras: list[Camera]
    test: list[tuple[Path, int]]
    rounds: int
    budget: int  # labels a caregiver gives per device per round
    strategy: str  # "uncertainty" (most uncertain first) or "random"
    seed: int = 0
    share_crops: bool = False
    refresh_package: Optional[Path] = None
    refresh_after: Optional[int] = None  # round after which refresh_package is published
    gate_dirs: list[str] = field(default_factory=list)


@dataclass
class RoundRecord:
    round: int
    labels_spent: int
    device_accuracy: list[float]  # each camera on its own held-out frames, with its own adaptation
    global_accuracy: float
    global_macro_f1: float
    head_version: int
    package_version: str
    global_confusion: list = field(default_factory=list)
    refreshed: bool = False
    gate: Optional[dict] = None


class TestSet:
    """The held-out photos, embedded once per extractor (re-embedded after a refresh)."""

    def __init__(self, items: list[tuple[Path, int]]):
        self.items = items
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def embedded(self, device: Device) -> tuple[np.ndarray, np.ndarray]:
        key = device.package.version
        if key not in self._cache:
            data = embed_items(device, self.items, "held-out")
            self._cache[key] = (data.embeddings, data.labels)
        return self._cache[key]

    def score(self, head: OnlineHead, device: Device) -> dict:
        x, y = self.embedded(device)
        return summarize(y, head.predict_proba(x).argmax(axis=1), len(device.classes))


class CameraTests:
    """Each camera's own held-out frames (its mix, through its profile), embedded once per extractor."""

    def __init__(self, cameras: list[Camera]):
        self.cameras = cameras
        self._frames: dict[str, list[tuple[np.ndarray, int]]] = {}
        self._cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def _rendered(self, cam: Camera) -> list[tuple[np.ndarray, int]]:
        if cam.name not in self._frames:
            out = []
            for j, (path, label) in enumerate(cam.test):
                try:
                    out.append((frame(path, cam.profile, seed=10_000 + j), label))
                except ImageError:
                    continue
            self._frames[cam.name] = out
        return self._frames[cam.name]

    def accuracy(self, cam: Camera, device: Device) -> float:
        key = (cam.name, device.package.version)
        if key not in self._cache:
            frames = self._rendered(cam)
            x = np.concatenate([device.extractor(device.prepare(f).tensor) for f, _ in frames])
            self._cache[key] = (x, np.array([y for _, y in frames]))
        x, y = self._cache[key]
        return float((device.learner.predict_proba(x).argmax(axis=1) == y).mean())


def pick(uncertainties: np.ndarray, budget: int, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of the frames the caregiver labels: the most uncertain first, or at random."""
    n = min(budget, len(uncertainties))
    if strategy == "uncertainty":
        return np.argsort(-uncertainties, kind="stable")[:n]
    if strategy == "random":
        return rng.choice(len(uncertainties), size=n, replace=False)
    raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")


def _global_head(server: LocalServer) -> tuple[OnlineHead, int, str]:
    http = Http(server.url, server.admin)
    info = http.request("GET", "/v1/model").json()
    resp = http.request("GET", info["files"]["global_head"]["url"])
    return OnlineHead.from_bytes(resp.body), int(info["head_version"]), str(info["package_version"])


def run_fleet(plan: FleetPlan, work: Path, on_round: Callable[[RoundRecord], None] = lambda r: None,
              mlflow: bool = True) -> list[RoundRecord]:
    """Simulate ``plan`` with a fresh server under ``work``; returns one record per round (0 = before learning)."""
    server = _fresh_server(plan, work, mlflow)
    test, own = TestSet(plan.test), CameraTests(plan.cameras)
    rng = np.random.default_rng(plan.seed)
    config = replace(DEVICE_CONFIG, share_crops=plan.share_crops, seed=plan.seed)
    atexit.register(server.close)  # the finally below covers errors and Ctrl-C; this, an exit from elsewhere
    try:
        server.process.start()
        names = [cam.name for cam in plan.cameras]
        devices = [_joined(Device(plan.package, work / "devices" / name, config), server, name) for name in names]
        chunks = [np.array_split(np.arange(len(cam.stream)), plan.rounds) for cam in plan.cameras]
        records = [_record(0, 0, devices, server, test, own)]
        on_round(records[-1])
        spent = 0
        for r in range(1, plan.rounds + 1):
            devices, given = _label_round(plan, r, chunks, devices, names, server, rng)
            spent += given
            server.aggregate()
            gate = _refresh(plan, r, spent, devices, server, test, own)
            # pull the new global head (and package, if one was published)
            devices = [_synced(device, server, name) for device, name in zip(devices, names)]
            records.append(_record(r, spent, devices, server, test, own, refreshed=gate is not None and gate.get("promoted", False),
                                   gate=gate))
            on_round(records[-1])
        if mlflow and not server.flush_tracking():
            print("warning: MLflow did not get every round before the server stopped", file=sys.stderr)
        return records
    finally:
        atexit.unregister(server.close)
        server.close()


def _fresh_server(plan: FleetPlan, work: Path, mlflow: bool) -> LocalServer:
    """A server on an emptied ``work`` folder, serving the plan's package (not started yet)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = {"INFANTINO_GATE_DIRS": os.pathsep.join(plan.gate_dirs)} if plan.gate_dirs else None
    return LocalServer(work, plan.package, env=env,
                       mlflow_uri=f"sqlite:///{work / 'server' / 'mlflow.db'}" if mlflow else "off")


def _joined(device: Device, server: LocalServer, name: str) -> Device:
    report = sync_device(device, server.url, server.token(name))
    if report.error:
        raise RuntimeError(f"{name}: first sync failed: {report.error}")
    return device


def _synced(device: Device, server: LocalServer, name: str) -> Device:
    report = sync_device(device, server.url, server.token(name))
    _check(report, name)
    return device


def _label_round(plan: FleetPlan, r: int, chunks: list, devices: list[Device], names: list[str], server: LocalServer,
                 rng: np.random.Generator) -> tuple[list[Device], int]:
    """Round ``r`` on every camera: its frames, the caregiver's labels, learning and a sync;
    returns the devices and how many labels were given."""
    out, spent = [], 0
    for i, device in enumerate(devices):
        cam = plan.cameras[i]
        frames = [(cam.stream[j], int(j)) for j in chunks[i][r - 1]]
        device, given = _label_and_push(device, cam, frames, plan, rng, server, names[i])
        out.append(device)
        spent += given
    return out, spent


def _label_and_push(device: Device, cam: Camera, frames: list[tuple[tuple[Path, int], int]], plan: FleetPlan,
                    rng: np.random.Generator, server: LocalServer, name: str) -> tuple[Device, int]:
    """The device predicts its frames (through its camera's profile), learns the ``plan.budget`` the
    caregiver picks, saves and syncs."""
    preds, labels = [], []
    for (path, label), j in frames:
        try:
            preds.append(device.predict(frame(path, cam.profile, seed=j), enqueue=False))
            labels.append(label)
        except ImageError:
            continue
    if not preds:
        return device, 0
    given = 0
    first = sorted({p.frame_key: i for i, p in reversed(list(enumerate(preds)))}.values())  # a frame seen twice is queued once
    for k in pick(np.array([preds[i].uncertainty for i in first]), plan.budget, plan.strategy, rng):
        device.learn(preds[first[k]], labels[first[k]])
        given += 1
    device.save()
    return _synced(device, server, name), given


def _refresh(plan: FleetPlan, r: int, spent: int, devices: list[Device], server: LocalServer, test: "TestSet",
             own: CameraTests) -> Optional[dict]:
    """After the plan's refresh round, publish the refreshed package; the gate's answer with the scores before."""
    if plan.refresh_package is None or plan.refresh_after != r:
        return None
    before = _record(r, spent, devices, server, test, own)
    return {**publish_refresh(server, plan.refresh_package), "held_out_before": before.global_accuracy,
            "device_accuracy_before": before.device_accuracy}


def publish_refresh(server: LocalServer, package: Path) -> dict:
    """Publish a refreshed package through the gate (``infantino-export publish``'s path)."""
    from infantino.export.publish import publish

    status, answer = publish(package, server.url, server.admin)
    return {"status": status, **answer}


def _check(report, name: str) -> None:
    if report.error:
        raise RuntimeError(f"{name}: sync failed: {report.error}")


def _record(r: int, spent: int, devices: list[Device], server: LocalServer, test: TestSet, own: CameraTests,
            refreshed: bool = False, gate: Optional[dict] = None) -> RoundRecord:
    head, version, package = _global_head(server)
    ref = devices[0]
    g = test.score(head, ref)
    return RoundRecord(r, spent, [own.accuracy(cam, d) for cam, d in zip(own.cameras, devices)], g["accuracy"],
                       g["macro_f1"], version, package, g["confusion"], refreshed, gate)

