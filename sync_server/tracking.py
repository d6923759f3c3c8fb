"""MLflow bookkeeping through an outbox: devices never wait for MLflow.

Promotions and aggregations write a row to ``tracking_outbox`` inside their own
transaction. A background thread (one per process; a lease in the store lets only one
process talk to MLflow at a time) turns each row into MLflow records, in order:

* ``package``: a run in ``infantino-packages`` with the package files as artifacts; a
  version of the registered model ``infantino-extractor`` and one of ``infantino-head``
  (the bootstrap head);
* ``aggregation``: a run in ``infantino-federated`` (strategy, K, devices, staleness,
  metrics, the new head's arrays as an artifact) and a version of ``infantino-head``; a round
  the head gate refused is a run tagged ``decision=refused`` with both accuracies
  (``head_gate.*``) and no head version.

After a pass that logged something the ``production`` alias of both registered models is
set to what the store serves; an alias moved by hand in MLflow is applied with
``infantino-server promote --from-mlflow-alias`` (and left alone until then). MLflow down or slow only delays this: the rows wait, with their last error,
and are logged when it is back. Every step looks for what a previous, interrupted try
already wrote (runs are tagged with their outbox reference), so nothing is logged twice.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from . import store as st

log = logging.getLogger("infantino.server")

EXTRACTOR_MODEL = "infantino-extractor"
HEAD_MODEL = "infantino-head"
ALIAS = "production"
PACKAGE_EXPERIMENT = "infantino-packages"
FEDERATED_EXPERIMENT = "infantino-federated"
GATE_EXPERIMENT = "infantino-gates"
LEASE = "tracking"


def _numeric(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class Tracker:
    def __init__(self, store: st.Store, data_dir: Path, tracking_uri: str, artifact_root: Optional[Path] = None,
                 poll_s: float = 5.0, max_backoff_s: float = 120.0):
        self.store = store
        self.data_dir = Path(data_dir)
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root) if artifact_root else None
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.last_error: Optional[str] = None
        self._client = None
        self._experiments: dict[str, str] = {}
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None
        self._drain_lock = threading.Lock()
        self._stop = False

    # ------------------------------------------------------------ background
    def start(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._thread = threading.Thread(target=self._loop, name="infantino-tracking", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def _loop(self) -> None:
        failures = 0
        while not self._stop:
            try:
                result = self.drain()
                failures = failures + 1 if result.get("error") else 0
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                failures += 1
                self.last_error = _one_line(exc)
            wait = self.poll_s if failures == 0 else min(self.max_backoff_s, self.poll_s * 2 ** min(failures, 8)) * random.uniform(0.8, 1.2)
            self._wake.wait(wait)
            self._wake.clear()

    # ------------------------------------------------------------ draining
    def drain(self, max_items: int = 100, lease_s: float = 300.0) -> dict:
        """Log pending outbox rows in order; stops at the first failure. Returns counts."""
        if not self._drain_lock.acquire(blocking=False):
            return {"logged": 0, "skipped": "busy in this process"}
        try:
            try:
                if not self.store.pending_outbox(1):
                    return {"logged": 0}  # nothing to do: no lease, no write
                if not self.store.acquire_lease(LEASE, self.owner, lease_s):
                    return {"logged": 0, "skipped": "another process holds the tracking lease"}
            except st.StoreBusy as exc:
                return {"logged": 0, "error": _one_line(exc)}
            logged = 0
            try:
                pending = self.store.pending_outbox(max_items)
                for item in pending:
                    try:
                        self._log(item)
                    except Exception as exc:  # noqa: BLE001 - MLflow errors are many and varied
                        self.last_error = _one_line(exc)
                        log.warning("MLflow logging of %s %s failed (will retry): %s", item["kind"], item["ref"], self.last_error)
                        self.store.outbox_failed(item["id"], self.last_error)
                        return {"logged": logged, "error": self.last_error, "pending": len(pending) - logged}
                    self.store.outbox_done(item["id"])
                    logged += 1
                    self.store.acquire_lease(LEASE, self.owner, lease_s)
                if logged:  # only after a change on the server: an alias moved by hand waits for
                    self._sync_aliases()  # `infantino-server promote --from-mlflow-alias`
                self.last_error = None
                return {"logged": logged}
            except Exception as exc:  # noqa: BLE001
                self.last_error = _one_line(exc)
                return {"logged": logged, "error": self.last_error}
            finally:
                try:
                    self.store.release_lease(LEASE, self.owner)
                except st.StoreError:
                    pass
        finally:
            self._drain_lock.release()

    # ------------------------------------------------------------ MLflow
    def client(self):
        if self._client is None:
            # Fail fast against a remote server that is down; the outbox retries later.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            client.search_experiments(max_results=1)  # touch the backend: raises if it is down
            self._client = client
        return self._client

    def _experiment(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = (self.artifact_root / name).resolve().as_uri() if self.artifact_root else None
            try:
                exp_id = client.create_experiment(name, artifact_location=location)
            except Exception:  # noqa: BLE001 - created meanwhile by someone else
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        self._experiments[name] = exp_id
        return exp_id

    def _run_for(self, experiment: str, ref: str, run_name: str, start_time: float):
        client = self.client()
        exp_id = self._experiment(experiment)
        found = client.search_runs([exp_id], filter_string=f"tags.`infantino.ref` = '{ref}'", max_results=1)
        if found:
            return found[0]
        return client.create_run(exp_id, start_time=int(start_time * 1000), tags={"infantino.ref": ref}, run_name=run_name)

    def _model_version(self, name: str, run, subdir: str, tags: dict) -> str:
        client = self.client()
        try:
            client.get_registered_model(name)
        except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
            try:
                client.create_registered_model(name)
            except Exception:  # noqa: BLE001 - created meanwhile
                client.get_registered_model(name)
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'"):
            return str(mv.version)
        mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/{subdir}", run_id=run.info.run_id,
                                         tags={k: str(v) for k, v in tags.items()})
        return str(mv.version)

    def _log(self, item: dict) -> None:
        if item["kind"] == "package":
            self._log_package(item["ref"])
        elif item["kind"] == "aggregation":
            self._log_aggregation(int(item["ref"]))
        elif item["kind"] == "gate":
            self._log_gate(int(item["ref"]))
        elif item["kind"] == "serve":
            pass  # a rollback: nothing to log, the aliases follow below
        else:
            raise ValueError(f"unknown outbox kind {item['kind']!r}")

    def _log_package(self, version: str) -> None:
        from sqlalchemy import select

        pkg = self.store.package(version)
        if pkg is None:
            raise ValueError(f"package {version} is not in the store")
        manifest = json.loads(pkg["manifest"])
        client = self.client()
        run = self._run_for(PACKAGE_EXPERIMENT, f"package:{version}", f"package-{version}", pkg["created_at"])
        rid = run.info.run_id
        with self.store.read() as conn:
            head_row = conn.execute(select(st.heads.c.version, st.heads.c.blob).where(
                st.heads.c.package_version == version, st.heads.c.source == "bootstrap")).first()
        if not client.list_artifacts(rid, "package"):
            client.log_artifacts(rid, str(self.data_dir / pkg["folder"]), "package")
        if head_row is not None and not client.list_artifacts(rid, "head"):
            self._log_blob(rid, "head", f"global-head-{head_row.version}.npz", head_row.blob)
        if not run.data.params:
            client.log_param(rid, "package_version", version)
            client.log_param(rid, "embedding_dim", manifest.get("embedding_dim"))
            client.log_param(rid, "manifest_sha256", pkg["manifest_sha256"])
            metrics = _numeric(manifest.get("metrics", {}))
            for k, v in metrics.items():
                client.log_metric(rid, k, v)
        mv = self._model_version(EXTRACTOR_MODEL, run, "package", {"package_version": version, "manifest_sha256": pkg["manifest_sha256"]})
        self.store.set_mlflow_version("packages", version, mv)
        if head_row is not None:
            hv = self._head_version_for(run, head_row.version, version, source="bootstrap")
            self.store.set_mlflow_version("heads", head_row.version, hv)
        client.set_terminated(rid)

    def _log_gate(self, gate_id: int) -> None:
        """A publish decision: both packages' scores on every held-out set, the verdict as a tag."""
        from mlflow.entities import Metric, Param, RunTag
        from sqlalchemy import select

        with self.store.read() as conn:
            row = conn.execute(select(st.gates).where(st.gates.c.id == gate_id)).first()
        if row is None:
            raise ValueError(f"gate decision {gate_id} is not in the store")
        result = json.loads(row.result)
        run = self._run_for(GATE_EXPERIMENT, f"gate:{gate_id}", f"gate-{gate_id}-{row.candidate_version}"[:250], row.created_at)
        rid = run.info.run_id
        if not run.data.params:
            ts = int(row.created_at * 1000)
            metrics = []
            names = _set_names([s["path"] for s in result.get("candidate") or []])
            for who in ("candidate", "current"):
                for i, (s, name) in enumerate(zip(result.get(who) or [], names)):
                    metrics += [Metric(f"{who}_accuracy.{name}", float(s["accuracy"]), ts, 0),
                                Metric(f"{who}_macro_f1.{name}", float(s["macro_f1"]), ts, 0)]
                    if i == 0:  # the deciding set, under a fixed name for comparing runs
                        metrics += [Metric(f"{who}_accuracy", float(s["accuracy"]), ts, 0),
                                    Metric(f"{who}_n", float(s["n"]), ts, 0)]
            params = [Param("candidate_version", row.candidate_version), Param("current_version", str(row.current_version)),
                      Param("tolerance", str(result.get("tolerance"))),
                      Param("held_out_sets", ",".join(s["path"] for s in result.get("candidate") or [])[:500])]
            tags = [RunTag("decision", row.decision), RunTag("gate", "passed" if row.passed else "failed"),
                    RunTag("reason", result.get("reason", "")[:4900])]
            self.client().log_batch(rid, metrics=metrics, params=params, tags=tags)
        self.client().set_terminated(rid, end_time=int(time.time() * 1000))

    def _head_version_for(self, run, head_version: int, package_version: str, source: str) -> str:
        return self._model_version(HEAD_MODEL, run, "head", {"head_version": head_version, "package_version": package_version,
                                                             "source": source})

    def _log_blob(self, run_id: str, subdir: str, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client().log_artifact(run_id, str(path), subdir)

    def _log_aggregation(self, agg_id: int) -> None:
        from mlflow.entities import Metric, Param
        from sqlalchemy import select

        agg = self.store.aggregation(agg_id)
        if agg is None:
            raise ValueError(f"aggregation {agg_id} is not in the store")
        client = self.client()
        run = self._run_for(FEDERATED_EXPERIMENT, f"aggregation:{agg_id}", f"aggregation-{agg_id}", agg["created_at"])
        rid = run.info.run_id
        info = json.loads(agg["info"])
        devices = json.loads(agg["devices"])
        strategy = json.loads(agg["strategy"])
        served = agg["new_head_version"] != agg["base_head_version"]
        if not run.data.params:
            params = {f"strategy.{k}": v for k, v in strategy.items()}
            params.update(k=agg["k"], package_version=agg["package_version"], base_head_version=agg["base_head_version"],
                          new_head_version=agg["new_head_version"], aggregation_id=agg_id)
            ts = int(agg["created_at"] * 1000)
            metrics = _numeric(info)
            metrics["n_devices"] = float(len(devices))
            metrics.update({f"head_gate.{k}": v for k, v in _numeric(info.get("head_gate") or {}).items()})
            client.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()],
                             params=[Param(k, str(v)) for k, v in params.items()], tags=_gate_tags(info, served))
            client.set_tag(rid, "devices", ",".join(devices)[:4900])
        if not served:  # the head gate refused the candidate: nothing new to register, the alias stays
            if not client.list_artifacts(rid, "aggregation"):
                summary = {**agg, "info": info, "devices": devices, "strategy": strategy, "update_ids": json.loads(agg["update_ids"])}
                self._log_blob(rid, "aggregation", "aggregation.json", json.dumps(summary, indent=1).encode())
            client.set_terminated(rid, end_time=int(time.time() * 1000))
            return
        if not client.list_artifacts(rid, "head"):
            with self.store.read() as conn:
                blob = conn.execute(select(st.heads.c.blob).where(st.heads.c.version == agg["new_head_version"])).scalar_one()
            self._log_blob(rid, "head", f"global-head-{agg['new_head_version']}.npz", blob)
            summary = {**agg, "info": info, "devices": devices, "strategy": strategy, "update_ids": json.loads(agg["update_ids"])}
            self._log_blob(rid, "aggregation", "aggregation.json", json.dumps(summary, indent=1).encode())
        hv = self._head_version_for(run, agg["new_head_version"], agg["package_version"], source="aggregation")
        self.store.set_mlflow_version("heads", agg["new_head_version"], hv)
        client.set_terminated(rid, end_time=int(time.time() * 1000))

    def _sync_aliases(self) -> None:
        """Point ``production`` at what the store serves (once both are registered)."""
        serving = self.store.serving()
        if serving is None:
            return
        pkg = self.store.package(serving.package_version)
        with self.store.read() as conn:
            from sqlalchemy import select

            head_mv = conn.execute(select(st.heads.c.mlflow_version).where(st.heads.c.version == serving.head_version)).scalar_one_or_none()
        client = self.client()
        for model, version in ((EXTRACTOR_MODEL, pkg and pkg.get("mlflow_version")), (HEAD_MODEL, head_mv)):
            if not version:
                continue
            try:
                current = client.get_model_version_by_alias(model, ALIAS).version
            except Exception:  # noqa: BLE001 - alias not set yet
                current = None
            if str(current) != str(version):
                client.set_registered_model_alias(model, ALIAS, str(version))

    def alias_targets(self) -> tuple[Optional[str], Optional[int]]:
        """(package version, head version) the ``production`` aliases point at in MLflow (None where unset)."""
        client = self.client()
        out: list = []
        for model, tag in ((EXTRACTOR_MODEL, "package_version"), (HEAD_MODEL, "head_version")):
            try:
                out.append(client.get_model_version_by_alias(model, ALIAS).tags.get(tag))
            except Exception:  # noqa: BLE001 - no such model or alias yet
                out.append(None)
        return out[0], None if out[1] is None else int(out[1])

    def status(self) -> dict:
        pending = self.store.pending_outbox(1000)
        return {"pending": len(pending), "last_error": self.last_error or (pending[0]["last_error"] if pending else None)}


def _gate_tags(info: dict, served: bool) -> list:
    """``decision`` (served/refused) and, when a head gate judged, ``head_gate`` and its ``reason``."""
    from mlflow.entities import RunTag

    tags = [RunTag("decision", "served" if served else "refused")]
    gate = info.get("head_gate")
    if gate:
        tags += [RunTag("head_gate", "passed" if gate.get("passed") else "failed"),
                 RunTag("reason", str(gate.get("reason", ""))[:4900])]
    return tags


def _set_names(paths: list[str]) -> list[str]:
    """MLflow-safe metric suffixes for held-out sets: the folder name, numbered when two share one."""
    base = ["".join(c if c.isalnum() or c in "_-." else "_" for c in Path(p).name)[:60] or "set" for p in paths]
    return [b if base.count(b) == 1 else f"{i}-{b}" for i, b in enumerate(base)]
