"""MLflow bookkeeping through an outbox: devices never wait for MLflow.

Promotions, aggregations and publish decisions write a row to ``tracking_outbox`` inside
their own transaction; an ``outbox.OutboxWorker`` (one thread per process, one process at a
time by a lease) hands each row, in order, to the ``MlflowRecorder`` here, which turns it
into MLflow records:

* ``package``: a run in ``infantino-packages`` with the package files as artifacts; a
  version of the registered model ``infantino-extractor`` and one of ``infantino-head``
  (the bootstrap head);
* ``aggregation``: a run in ``infantino-federated`` (strategy, K, devices, staleness,
  metrics, the new head's arrays as an artifact) and a version of ``infantino-head``; a round
  the head gate refused is a run tagged ``decision=refused`` with both accuracies
  (``head_gate.*``) and no head version;
* ``gate``: a run in ``infantino-gates`` with both packages' scores.

After a pass that logged something the ``production`` alias of both registered models is
set to what the store serves; an alias moved by hand in MLflow is applied with
``infantino-server promote --from-mlflow-alias`` (and left alone until then). MLflow down or slow only delays this: the rows wait, with their last error,
and are logged when it is back. Every step looks for what a previous, interrupted try
already wrote (runs are tagged with their outbox reference), so nothing is logged twice.

MLflow reads its HTTP timeout and retries only from the environment; ``TrackingSettings``
names ours and ``mlflow_http_env`` gives them to the process entry points (``cli``), which
own their environment. Nothing here changes ``os.environ``.
"""
from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from . import store as st
from .outbox import OutboxWorker, WorkerSettings

log = logging.getLogger("infantino.server")

EXTRACTOR_MODEL = "infantino-extractor"
HEAD_MODEL = "infantino-head"
ALIAS = "production"
PACKAGE_EXPERIMENT = "infantino-packages"
FEDERATED_EXPERIMENT = "infantino-federated"
GATE_EXPERIMENT = "infantino-gates"
LEASE = "tracking"


@dataclass(frozen=True)
class TrackingSettings:
    tracking_uri: str
    artifact_root: Optional[Path] = None  # where a local MLflow keeps artifacts (None: MLflow's default)
    http_timeout_s: float = 15.0  # a remote MLflow that hangs fails fast; the outbox retries later
    http_max_retries: int = 0


def mlflow_http_env(settings: TrackingSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """The MLflow HTTP variables to add to ``environ`` (those the operator has not set)."""
    ours = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(settings.http_max_retries)),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(round(settings.http_timeout_s)))}
    return {k: v for k, v in ours.items() if k not in environ}


def filter_literal(value: object) -> str:
    """``value`` as a string literal of MLflow's search grammar, which has no escapes: in single
    quotes, or in double quotes when it holds a single quote. A value that cannot be written
    (both quotes, a backslash, a line break) is refused rather than matched wrongly."""
    text = str(value)
    if "\\" in text or "\n" in text or "\r" in text or ("'" in text and '"' in text):
        raise ValueError(f"{text[:80]!r} cannot be written as an MLflow filter value")
    return f'"{text}"' if "'" in text else f"'{text}'"


def _is_missing(exc: BaseException) -> bool:
    """MLflow's own "does not exist": the model, version or alias is not there (anything else,
    MLflow down or refusing, is an error to retry)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return exc.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(exc) and "not found" in str(exc)


def _already_exists(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_ALREADY_EXISTS"


_NAME_BAD = re.compile(r"[^A-Za-z0-9_.:-]")


def mlflow_name(name: object) -> str:
    """A metric or param name MLflow accepts (alphanumerics _ . : -, no path tricks), at most 250 characters:
    rows stored before names were checked at the door still log."""
    text = _NAME_BAD.sub("_", str(name))[:250]
    return text if text and not text.startswith((".", "/")) else f"_{text}"[:250]


def _finite(v: object) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer beyond float range
        return False


def _numeric(d: dict) -> dict[str, float]:
    return {mlflow_name(k): float(v) for k, v in d.items() if _finite(v)}


def tracking_worker(store: st.Store, recorder: "MlflowRecorder", poll_s: float = 5.0,
                    max_backoff_s: float = 120.0) -> OutboxWorker:
    """The outbox worker that drains into ``recorder`` and then moves the aliases."""
    return OutboxWorker(store, recorder.record, after_pass=recorder.sync_aliases, permanent=permanent_error,
                        settings=WorkerSettings(lease=LEASE, poll_s=poll_s, max_backoff_s=max_backoff_s))


def permanent_error(exc: BaseException) -> bool:
    """An error of the row itself, which no retry fixes: MLflow refusing a value (a name, a param
    that changed), or our own reading of the row failing (its data gone or malformed). MLflow
    down, slow or refusing the connection, and the store busy, are retried instead."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code == "INVALID_PARAMETER_VALUE"
    return isinstance(exc, (ValueError, KeyError, TypeError))


class MlflowRecorder:
    """Turns one outbox row into MLflow records; idempotent, so an interrupted row is redone safely."""

    def __init__(self, store: st.Store, data_dir: Path, settings: TrackingSettings):
        self.store = store
        self.data_dir = Path(data_dir)
        self.settings = settings
        self._client = None
        self._experiments: dict[str, str] = {}

    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            uri = self.settings.tracking_uri
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # touch the backend: raises if it is down
            self._client = client
        return self._client

    def record(self, item: dict) -> None:
        if item["kind"] == "package":
            self._log_package(item["ref"])
        elif item["kind"] == "aggregation":
            self._log_aggregation(int(item["ref"]))
        elif item["kind"] == "gate":
            self._log_gate(int(item["ref"]))
        elif item["kind"] == "serve":
            pass  # a rollback: nothing to log, the aliases follow after the pass
        else:
            raise ValueError(f"unknown outbox kind {item['kind']!r}")

    # ------------------------------------------------------------ experiments, runs, model versions
    def _experiment(self, name: str) -> str:
        if name not in self._experiments:
            client = self.client()
            exp = client.get_experiment_by_name(name)
            if exp is None:
                root = self.settings.artifact_root
                location = (Path(root) / name).resolve().as_uri() if root else None
                try:
                    exp_id = client.create_experiment(name, artifact_location=location)
                except Exception as exc:  # noqa: BLE001 - only "created meanwhile by someone else" is fine
                    exp = client.get_experiment_by_name(name) if _already_exists(exc) else None
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
            self._experiments[name] = exp_id
        return self._experiments[name]

    def _run_for(self, experiment: str, ref: str, run_name: str, start_time: float):
        client = self.client()
        exp_id = self._experiment(experiment)
        found = client.search_runs([exp_id], filter_string=f"tags.`infantino.ref` = {filter_literal(ref)}", max_results=1)
        if found:
            return found[0]
        return client.create_run(exp_id, start_time=int(start_time * 1000), tags={"infantino.ref": ref}, run_name=run_name)

    def _ensure_registered_model(self, name: str) -> None:
        client = self.client()
        try:
            client.get_registered_model(name)
        except Exception as exc:  # noqa: BLE001 - re-raised unless MLflow says it does not exist
            if not _is_missing(exc):
                raise
            try:
                client.create_registered_model(name)
            except Exception as again:  # noqa: BLE001 - created meanwhile by another process is fine
                if not _already_exists(again):
                    raise

    def _model_version(self, name: str, run, subdir: str, tags: dict) -> str:
        client = self.client()
        self._ensure_registered_model(name)
        query = f"name = {filter_literal(name)} and run_id = {filter_literal(run.info.run_id)}"
        for mv in client.search_model_versions(query):
            return str(mv.version)
        mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/{subdir}", run_id=run.info.run_id,
                                         tags={k: str(v) for k, v in tags.items()})
        return str(mv.version)

    def _head_version_for(self, run, head_version: int, package_version: str, source: str) -> str:
        return self._model_version(HEAD_MODEL, run, "head", {"head_version": head_version, "package_version": package_version,
                                                             "source": source})

    def _log_blob(self, run_id: str, subdir: str, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client().log_artifact(run_id, str(path), subdir)

    # ------------------------------------------------------------ the outbox kinds
    def _log_package(self, version: str) -> None:
        pkg = self.store.package(version)
        if pkg is None:
            raise ValueError(f"package {version} is not in the store")
        manifest = json.loads(pkg["manifest"])
        client = self.client()
        run = self._run_for(PACKAGE_EXPERIMENT, f"package:{version}", f"package-{version}", pkg["created_at"])
        rid = run.info.run_id
        with self.store.look() as u:
            head_row = u.bootstrap_head(version)
        if not client.list_artifacts(rid, "package"):
            client.log_artifacts(rid, str(self.data_dir / pkg["folder"]), "package")
        if head_row is not None and not client.list_artifacts(rid, "head"):
            self._log_blob(rid, "head", f"global-head-{head_row.version}.npz", bytes(head_row.blob))
        if not run.data.params:
            client.log_param(rid, "package_version", version)
            client.log_param(rid, "embedding_dim", manifest.get("embedding_dim"))
            client.log_param(rid, "manifest_sha256", pkg["manifest_sha256"])
            for k, v in _numeric(manifest.get("metrics", {})).items():
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

        with self.store.look() as u:
            row = u.gate_row(gate_id)
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

    def _log_aggregation(self, agg_id: int) -> None:
        from mlflow.entities import Metric, Param

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
            params = {mlflow_name(f"strategy.{k}"): v for k, v in strategy.items()}
            params.update(k=agg["k"], package_version=agg["package_version"], base_head_version=agg["base_head_version"],
                          new_head_version=agg["new_head_version"], aggregation_id=agg_id)
            ts = int(agg["created_at"] * 1000)
            metrics = _numeric(info)
            metrics["n_devices"] = float(len(devices))
            metrics.update({f"head_gate.{k}": v for k, v in _numeric(info.get("head_gate") or {}).items()})
            client.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()],
                             params=[Param(k, str(v)) for k, v in params.items()], tags=_gate_tags(info, served))
            client.set_tag(rid, "devices", ",".join(devices)[:4900])
        summary = {**agg, "info": info, "devices": devices, "strategy": strategy, "update_ids": json.loads(agg["update_ids"])}
        summary_json = json.dumps(summary, indent=1).encode()
        if not served:  # the head gate refused the candidate: nothing new to register, the alias stays
            if not client.list_artifacts(rid, "aggregation"):
                self._log_blob(rid, "aggregation", "aggregation.json", summary_json)
            client.set_terminated(rid, end_time=int(time.time() * 1000))
            return
        if not client.list_artifacts(rid, "head"):
            blob = self.store.head(agg["new_head_version"]).blob
            self._log_blob(rid, "head", f"global-head-{agg['new_head_version']}.npz", blob)
            self._log_blob(rid, "aggregation", "aggregation.json", summary_json)
        hv = self._head_version_for(run, agg["new_head_version"], agg["package_version"], source="aggregation")
        self.store.set_mlflow_version("heads", agg["new_head_version"], hv)
        client.set_terminated(rid, end_time=int(time.time() * 1000))

    # ------------------------------------------------------------ aliases
    def sync_aliases(self) -> None:
        """Point ``production`` at what the store serves (once both are registered)."""
        serving = self.store.serving()
        if serving is None:
            return
        pkg = self.store.package(serving.package_version)
        with self.store.look() as u:
            head_mv = u.head_mlflow_version(serving.head_version)
        client = self.client()
        for model, version in ((EXTRACTOR_MODEL, pkg and pkg.get("mlflow_version")), (HEAD_MODEL, head_mv)):
            if version and str(self._alias_version(model)) != str(version):
                client.set_registered_model_alias(model, ALIAS, str(version))

    def _alias_version(self, model: str, tag: Optional[str] = None):
        """The version (or one of its tags) ``production`` points at; None where MLflow says there is none."""
        try:
            mv = self.client().get_model_version_by_alias(model, ALIAS)
        except Exception as exc:  # noqa: BLE001 - re-raised unless MLflow says it does not exist
            if not _is_missing(exc):
                raise
            return None
        return mv.version if tag is None else mv.tags.get(tag)

    def alias_targets(self) -> tuple[Optional[str], Optional[int]]:
        """(package version, head version) the ``production`` aliases point at in MLflow (None where unset)."""
        package = self._alias_version(EXTRACTOR_MODEL, "package_version")
        head = self._alias_version(HEAD_MODEL, "head_version")
        return package, None if head is None else int(head)


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
