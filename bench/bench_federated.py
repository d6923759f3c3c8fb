"""Federated learning on the infant photos: aggregated head vs single devices, staleness, robustness.

    python bench/bench_federated.py [--package data/models/<pkg>] [--devices 4] [--rounds 4]
                                    [--seeds 0,1,2] [--out bench/results/federated.json]

Part 1, the product path (one seed, the first of --seeds): a real ``infantino-server`` (gunicorn,
2 workers, MLflow on SQLite) and N real ``Device`` objects, each with its own state folder,
each learning from its own stratified share of the infant photos (fed in R chunks, one chunk
per round), syncing after every chunk through ``sync_device`` (push delta, pull + adopt + replay).
Held-out photos (30 %, duplicates kept on one side) are never learned. Reported: accuracy on
the held-out photos of the bootstrap head, of each device learning alone (same data, no sync),
of the final aggregated (global) head, of each synced device's own head, and of one device
that learned every share (the centralised upper bound).

Part 2, the server's choices (pure numpy, same embeddings, several seeds): asynchronous FedBuff
rounds where every update was computed on a head tau in {0..3} versions old; final accuracy
with staleness discount none / 1/sqrt(1+tau) / 1/(1+tau), tau up to 3 and up to 10; then one poisoned device (its delta
negated and scaled x8, inside the norm bound) against FedAvg, trimmed mean and median.

Photos are read from ../shared/data/infant (never copied); faces are cropped once with the
package's preprocessing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

def find_package(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    for manifest in sorted((REPO / "data" / "models").glob("**/manifest.json")):
        return manifest.parent
    raise SystemExit("no model package in data/models; pass --package DIR")


def load_faces(package: Path, seeds: list[int], devices: int, held_out: dict[str, float] | None = None) -> dict:
    """Per seed: crops (uint8, package size) and labels of the held-out parts (default ``{"test": 0.3}``)
    and one equal share of the rest per device. Every photo is cropped once; the splits keep
    duplicate files on one side."""
    from infantino.edge_runtime.core.datasets import infant_folder
    from infantino.edge_runtime.core.imagefolder import list_image_folder, split_items
    from infantino.edge_runtime.core.package import open_package
    from infantino.edge_runtime.core.facefinder import FaceFinder
    from infantino.edge_runtime.core.facefinder import prepare
    from infantino.edge_runtime.core.preprocess import ImageError

    opened = open_package(package)
    spec, finder = opened.manifest.preprocess, FaceFinder.for_package(opened)
    items = list_image_folder(infant_folder())
    crops: dict[Path, np.ndarray] = {}
    for path, _ in items:
        if path not in crops:
            try:
                crops[path] = prepare(path, spec, detect=True, finder=finder).crop
            except ImageError:
                continue
    held_out = held_out or {"test": 0.3}
    rest = 1.0 - sum(held_out.values())
    fractions = {**held_out, **{f"dev{i}": rest / devices for i in range(devices)}}
    out = {}
    for seed in seeds:
        parts = split_items(items, fractions, seed)
        out[seed] = {name: ([crops[p] for p, _ in its if p in crops], np.array([y for p, y in its if p in crops], np.int64))
                     for name, its in parts.items()}
    return out


def accuracy(head, x, y) -> float:
    return float((head.predict_proba(x).argmax(1) == y).mean())


# --------------------------------------------------------------------------- part 1: the product path


def product_path(package: Path, faces: dict, n_devices: int, rounds: int, work: Path, seed: int) -> dict:
    from infantino.edge_runtime.device import Device, DeviceConfig
    from infantino.edge_runtime.core.extractor import Extractor
    from infantino.edge_runtime.core.head import OnlineHead
    from infantino.edge_runtime.core.package import open_package
    from infantino.edge_runtime.core.preprocess import faces_tensor
    from infantino.edge_runtime.sync.client import DeviceLearner, sync_device
    from infantino.edge_runtime.sync.transport import Http
    from infantino.sync_server import store as st
    from infantino.sync_server.process import ServerProcess, served_store

    pkg = open_package(package)
    role = "extractor_int8" if pkg.has("extractor_int8") else "extractor"
    extractor = Extractor(pkg.path(role))
    x_test = extractor(faces_tensor(faces["test"][0], pkg.manifest.preprocess))
    y_test = faces["test"][1]
    config = DeviceConfig(detect_faces=False, seed=seed)  # the crops are faces already
    bootstrap = OnlineHead.load(pkg.path("head"))

    def device(name: str) -> DeviceLearner:
        return DeviceLearner(Device(package, work / "states" / name, config))

    def chunks(i: int):
        crops, labels = faces[f"dev{i}"]
        order = np.random.default_rng(seed + i).permutation(len(labels))
        return [[(crops[j], int(labels[j])) for j in part] for part in np.array_split(order, rounds)]

    # single devices: the same data, learned alone
    alone = []
    for i in range(n_devices):
        d = device(f"alone-{i}")
        for chunk in chunks(i):
            for crop, label in chunk:
                d.learn(crop, label)
        alone.append(accuracy(d.device.head, x_test, y_test))
    central = device("central")
    for i in range(n_devices):
        for chunk in chunks(i):
            for crop, label in chunk:
                central.learn(crop, label)

    # the federation: a real server, N devices, R rounds
    data = work / "server"
    data.mkdir(parents=True)
    store = served_store(st.sqlite_url(data / "server.db"), data, package)
    tokens = {f"cam{i}": store.add_client(f"cam{i}") for i in range(n_devices)}
    admin = store.rotate_admin()
    feds = {f"cam{i}": device(f"cam{i}") for i in range(n_devices)}
    all_chunks = {f"cam{i}": chunks(i) for i in range(n_devices)}
    history = []
    with ServerProcess(data, mlflow_uri=st.sqlite_url(data / "mlflow.db"), aggregate_k=n_devices) as server:
        for name, learner in feds.items():
            sync_device(learner, server.url, tokens[name])
        for r in range(rounds):
            for name, learner in feds.items():
                for crop, label in all_chunks[name][r]:
                    learner.learn(crop, label)
                report = sync_device(learner, server.url, tokens[name])
                if report.error or report.rejected:
                    raise RuntimeError(f"{name} round {r}: {report.error or report.rejected}")
            deadline = time.monotonic() + 30  # K = N: the step follows the last push of the round
            while store.buffered_count() and time.monotonic() < deadline:
                time.sleep(0.1)
            head = OnlineHead.from_bytes(store.head(store.serving().head_version).blob)
            history.append({"round": r + 1, "head_version": head.version, "global_accuracy": accuracy(head, x_test, y_test)})
        Http(server.url, admin).request("POST", "/v1/admin/aggregate", body=b"{}", headers={"Content-Type": "application/json"})
        for name, learner in feds.items():
            sync_device(learner, server.url, tokens[name])
        deadline = time.monotonic() + 180  # the server logs to MLflow in the background; wait for it
        while time.monotonic() < deadline:
            status = Http(server.url, admin).request("GET", "/v1/admin/status").json()
            if status["tracking"]["pending"] == 0:
                break
            Http(server.url, admin).request("POST", "/v1/admin/tracking/flush")
            time.sleep(1.0)
        flush = status["tracking"]
    final = OnlineHead.from_bytes(store.head(store.serving().head_version).blob)
    store.dispose()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(st.sqlite_url(data / "mlflow.db"))
    exp = client.get_experiment_by_name("infantino-federated")
    mlflow_runs = len(client.search_runs([exp.experiment_id])) if exp else 0
    head_versions = len(client.search_model_versions("name = 'infantino-head'"))
    return {
        "n_test": int(len(y_test)), "n_train_per_device": [int(len(faces[f"dev{i}"][1])) for i in range(n_devices)],
        "bootstrap_accuracy": accuracy(bootstrap, x_test, y_test),
        "single_device_accuracy": alone, "single_device_mean": float(np.mean(alone)),
        "global_head_accuracy": accuracy(final, x_test, y_test),
        "synced_device_accuracy": [accuracy(l.device.head, x_test, y_test) for l in feds.values()],
        "centralised_accuracy": accuracy(central.device.head, x_test, y_test),
        "rounds": history, "updates": status["updates"], "tracking_flush": flush,
        "mlflow_runs": mlflow_runs, "mlflow_head_versions": head_versions,
    }


# --------------------------------------------------------------------------- part 2: server choices


def embeddings(package: Path, faces: dict, n_devices: int):
    from infantino.edge_runtime.core.extractor import Extractor
    from infantino.edge_runtime.core.package import open_package
    from infantino.edge_runtime.core.preprocess import faces_tensor

    pkg = open_package(package)
    role = "extractor_int8" if pkg.has("extractor_int8") else "extractor"
    ex = Extractor(pkg.path(role))
    return {name: (ex(faces_tensor(c, pkg.manifest.preprocess)), y) for name, (c, y) in faces.items()}


def local_delta(head, x, y, rng, epochs: int = 3, batch: int = 16):
    """What a device sends: its head after a few epochs on its data, minus the head it started from."""
    local = head.copy()
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for s in range(0, len(y), batch):
            idx = order[s:s + batch]
            local.learn_step(x[idx], y[idx], steps=1) if hasattr(local, "learn_step") else local.partial_fit(x[idx], y[idx])
    from infantino.sync_server.aggregate import flatten

    return flatten(local.weights()) - flatten(head.weights())


def simulate(package: Path, emb: dict, n_devices: int, strategy, steps: int, seed: int, max_tau: int = 3,
             poisoned: int | None = None) -> float:
    """Asynchronous FedBuff: K = n_devices updates per step, each from a head tau versions old."""
    from infantino.edge_runtime.core.head import OnlineHead
    from infantino.edge_runtime.core.package import open_package
    from infantino.sync_server.aggregate import aggregate_deltas, apply_step

    rng = np.random.default_rng(seed)
    heads = [OnlineHead.load(open_package(package).path("head"))]
    x_test, y_test = emb["test"]
    for _ in range(steps):
        deltas, n, taus = [], [], []
        for i in range(n_devices):
            tau = min(int(rng.integers(0, max_tau + 1)) if max_tau else 0, len(heads) - 1)
            base = heads[len(heads) - 1 - tau]
            x, y = emb[f"dev{i}"]
            take = rng.choice(len(y), size=min(len(y), 24), replace=False)  # this round's new labels
            d = local_delta(base, x[take], y[take], rng)
            if poisoned is not None and i == poisoned:
                d = -8.0 * d
            deltas.append(d)
            n.append(len(take))
            taus.append(tau)
        step = aggregate_deltas(np.stack(deltas), n, taus, strategy)
        cur = heads[-1]
        layers = apply_step(cur.weights(), step.delta)
        k = len(layers) // 2
        heads.append(OnlineHead.from_arrays(layers[:k], layers[k:], cur.classes, cur.params, version=cur.version + 1))
    return accuracy(heads[-1], x_test, y_test)


def server_choices(package: Path, faces_by_seed: dict, n_devices: int, steps: int) -> dict:
    from infantino.sync_server.aggregate import Strategy

    out = {"staleness": {}, "robust": {}}
    embs = {seed: embeddings(package, f, n_devices) for seed, f in faces_by_seed.items()}
    for max_tau in (3, 10):
        for name in ("none", "sqrt", "linear"):
            accs = [simulate(package, embs[s], n_devices, Strategy(staleness=name), steps, s, max_tau=max_tau) for s in embs]
            out["staleness"][f"tau<={max_tau} {name}"] = {"mean": float(np.mean(accs)), "per_seed": accs}
    rules = {"fedavg": Strategy(), "trimmed_mean": Strategy(rule="trimmed_mean", trim_fraction=0.25, clip_norm="median"),
             "median": Strategy(rule="median", clip_norm="median")}
    for name, strategy in rules.items():
        clean = [simulate(package, embs[s], n_devices, strategy, steps, s) for s in embs]
        bad = [simulate(package, embs[s], n_devices, strategy, steps, s, poisoned=0) for s in embs]
        out["robust"][name] = {"clean": float(np.mean(clean)), "poisoned": float(np.mean(bad))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="server steps in the part 2 simulations")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--product-seeds", type=int, default=3, help="how many of --seeds run the real-server part")
    p.add_argument("--skip-product", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "federated.json"))
    args = p.parse_args(argv)
    package = find_package(args.package)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    from infantino.edge_runtime.core.datasets import DataMissing

    try:
        faces = load_faces(package, seeds, args.devices)
    except DataMissing as exc:
        sys.exit(f"bench_federated: {exc}")
    print(f"cropped {sum(len(v[1]) for v in faces[seeds[0]].values())} photos per split in {time.perf_counter() - t0:.0f} s")
    from infantino.edge_runtime.core.package import open_package

    shown = package.resolve().relative_to(REPO) if package.resolve().is_relative_to(REPO) else package
    result = {"package": str(shown), "package_version": open_package(package).version, "devices": args.devices, "rounds": args.rounds, "seeds": seeds}
    work = Path(tempfile.mkdtemp(prefix="infantino-fed-"))
    try:
        if not args.skip_product:
            runs = []
            for seed in seeds[:args.product_seeds]:
                r = product_path(package, faces[seed], args.devices, args.rounds, work / f"seed{seed}", seed)
                runs.append({"seed": seed, **r})
                print(f"\nseed {seed}: held-out infant photos n={r['n_test']}; {args.devices} devices x {r['n_train_per_device']} photos, {args.rounds} rounds")
                print(f"  bootstrap head            {r['bootstrap_accuracy']:.3f}")
                print(f"  single devices (mean)     {r['single_device_mean']:.3f}  {[round(a, 3) for a in r['single_device_accuracy']]}")
                print(f"  aggregated global head    {r['global_head_accuracy']:.3f}")
                print(f"  synced devices            {[round(a, 3) for a in r['synced_device_accuracy']]}")
                print(f"  one device, all data      {r['centralised_accuracy']:.3f}")
                print(f"  rounds: {[(h['head_version'], round(h['global_accuracy'], 3)) for h in r['rounds']]}")
                print(f"  MLflow: {r['mlflow_runs']} aggregation runs, {r['mlflow_head_versions']} registered head versions")
            keys = ("bootstrap_accuracy", "single_device_mean", "global_head_accuracy", "centralised_accuracy")
            summary = {k: float(np.mean([r[k] for r in runs])) for k in keys}
            summary["synced_device_mean"] = float(np.mean([np.mean(r["synced_device_accuracy"]) for r in runs]))
            summary["global_beats_single_mean"] = sum(r["global_head_accuracy"] > r["single_device_mean"] for r in runs)
            result["product_path"] = {"runs": runs, "mean": summary}
            print(f"\nmean over seeds {[r['seed'] for r in runs]}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
        choices = server_choices(package, faces, args.devices, args.steps)
        result["server_choices"] = choices
        print(f"\nasynchronous steps (each update tau versions old, tau uniform), accuracy on held-out photos, mean of seeds {seeds}:")
        for name, v in choices["staleness"].items():
            print(f"  {name:16} {v['mean']:.3f}  {[round(a, 3) for a in v['per_seed']]}")
        print("one device poisoned (delta x -8):")
        for name, v in choices["robust"].items():
            print(f"  {name:13} clean {v['clean']:.3f}  poisoned {v['poisoned']:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **result}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
