"""``infantino-server``: run the sync server and administer it.

    infantino-server run [--data-dir DIR] [--host 127.0.0.1] [--port 8080] [--workers 2] [--no-default-package]
    infantino-server device add NAME | list | revoke NAME | purge NAME
    infantino-server crops list | export DIR [--device NAME]
    infantino-server admin-token
    infantino-server promote PACKAGE_DIR [--gate-dir DIR ...] | --head-version N
    infantino-server aggregate [--min-updates 1]
    infantino-server status | flush-tracking

Every subcommand takes ``--data-dir`` / ``--db-url`` / ``--mlflow-uri`` (or the
``INFANTINO_DATA_DIR`` / ``INFANTINO_DB_URL`` / ``INFANTINO_MLFLOW_URI`` variables).
On a store that serves nothing yet, ``run`` first promotes ``--default-package`` /
``$INFANTINO_DEFAULT_PACKAGE``, else ``./data/models``, else the release installed with this
code (the wheel's bundled device files), so a fresh server answers devices with a model. Bad
input: one line on stderr, exit 1 (2 for a wrong command line); ``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Optional

from infantino.edge_runtime.core.clitools import OneLineParser, UsageError, add_verbose, run_command

from .cli_serving import DEFAULT_PACKAGE_ENV, PROG, default_package, promote_dir, serve_default_if_empty

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder for the SQLite store, MLflow and package files "
                                      "(default: $INFANTINO_DATA_DIR or ~/.local/share/infantino-server)")
    p.add_argument("--db-url", help="SQLAlchemy URL of the store, e.g. postgresql+psycopg2://user:pw@host/db")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: SQLite under the data dir; 'off' disables)")
    add_verbose(p, top=False)


def _overrides(args: argparse.Namespace) -> dict:
    out = {}
    for attr, key in (("data_dir", "DATA_DIR"), ("db_url", "DB_URL"), ("mlflow_uri", "MLFLOW_URI")):
        value = getattr(args, attr, None)
        if value:
            out[key] = value
    return out


def _state(args: argparse.Namespace):
    """The server state for one command. This process is ours: MLflow's HTTP settings (it reads
    them only from the environment) go into its environment, where the operator set none."""
    from . import create_app
    from .tracking import mlflow_http_env

    try:
        app = create_app({**_overrides(args), "BACKGROUND": False})
    except ModuleNotFoundError as exc:
        if exc.name in ("psycopg2", "psycopg"):
            raise RuntimeError("the PostgreSQL driver is not installed: pip install 'infantino-edge[postgres]'") from exc
        raise
    state = app.extensions["infantino"]
    if state.recorder is not None:
        os.environ.update(mlflow_http_env(state.recorder.settings, os.environ))
    return state


def parse_strategy(text: str) -> dict:
    """``--strategy`` JSON, checked by ``Strategy`` itself, so a typo fails here in one line
    rather than in every gunicorn worker."""
    from .aggregate import Strategy

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--strategy is not valid JSON ({exc.msg} at character {exc.pos}): {text[:80]}") from None
    if not isinstance(value, dict):
        raise ValueError(f'--strategy must be a JSON object such as {{"rule": "median"}}, not {text[:80]}')
    try:
        Strategy.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--strategy: {exc}") from None
    return value


def _when(ts: Optional[float]) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


# --------------------------------------------------------------------------- subcommands


def cmd_run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    for key, value in _overrides(args).items():
        env[f"INFANTINO_{key}"] = str(value)
    if args.aggregate_k is not None:
        env["INFANTINO_AGGREGATE_K"] = str(args.aggregate_k)
    if args.gate_dir:
        env["INFANTINO_GATE_DIRS"] = os.pathsep.join(str(Path(d).resolve()) for d in args.gate_dir)
    if args.gate_tolerance is not None:
        env["INFANTINO_GATE_TOLERANCE"] = str(args.gate_tolerance)
    if args.strategy:
        env["INFANTINO_STRATEGY"] = json.dumps(parse_strategy(args.strategy))
    os.environ.update(env)
    state = _state(args)  # create (or upgrade) the tables once, before the workers race to
    if state.recorder is not None:
        from .tracking import mlflow_http_env

        env.update(mlflow_http_env(state.recorder.settings, env))
    print(f"{PROG}: store {state.db_url.split('@')[-1]}, MLflow {state.mlflow_uri or 'off'}, "
          f"data {state.data_dir}", file=sys.stderr)
    serve_default_if_empty(state, default_package(args))
    state.store.dispose()
    if args.dev or not _has_gunicorn():
        from werkzeug.serving import run_simple

        from . import create_app

        run_simple(args.host, args.port, create_app(), threaded=True)
        return 0
    # infantino.sync_server.gunicorn_conf: the slow-client-safe gthread worker, timeouts, the metrics folder
    argv = [sys.executable, "-m", "gunicorn", "--config", "python:infantino.sync_server.gunicorn_conf", "--workers", str(args.workers),
            "--threads", str(args.threads), "--bind", f"{args.host}:{args.port}"]
    if args.access_log:
        argv += ["--access-logfile", "-"]
    argv.append("infantino.sync_server.wsgi:app")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def _has_gunicorn() -> bool:
    import importlib.util

    return importlib.util.find_spec("gunicorn") is not None


def cmd_device(args: argparse.Namespace) -> int:
    from .store import StoreError

    state = _state(args)
    try:
        if args.action == "add":
            token = state.store.add_client(args.name, "device")
            print(token)
            print(f"device {args.name!r} added; the token above is shown only once", file=sys.stderr)
        elif args.action == "revoke":
            state.store.revoke(args.name)
            print(f"device {args.name!r} revoked")
        elif args.action == "purge":
            from .crops import purge

            print(f"deleted {purge(state.store, args.name)} crop(s) of device {args.name!r}")
        else:
            rows = [c for c in state.store.list_clients() if c["kind"] == "device"]
            if args.json:
                print(json.dumps(rows))
            else:
                print(f"{'name':24} {'created':21} {'last update':21} status")
                for c in rows:
                    status = "revoked" if c["revoked_at"] else "active"
                    print(f"{c['name']:24} {_when(c['created_at']):21} {_when(c['last_update']):21} {status}")
    except StoreError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_crops(args: argparse.Namespace) -> int:
    from . import crops
    from .store import StoreError

    state = _state(args)
    if args.action == "list":
        rows = crops.counts(state.store)
        if args.json:
            print(json.dumps(rows))
        else:
            print(f"{'device':24} {'label':>5} {'crops':>6}")
            for r in rows:
                print(f"{r['device']:24} {r['label']:5d} {r['n']:6d}")
            print(f"{sum(r['n'] for r in rows)} crop(s) from {len({r['device'] for r in rows})} device(s)")
        return 0
    serving = state.store.serving()
    if serving is None:
        print(f"{PROG}: error: nothing is served yet, so the class names are unknown", file=sys.stderr)
        return 1
    try:
        n = crops.export_folder(state.store, Path(args.out), list(serving.manifest["classes"]), args.device)
    except StoreError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {n} crop(s) to {args.out} (ImageFolder; train with infantino-export train --images {args.out})")
    return 0


def cmd_admin_token(args: argparse.Namespace) -> int:
    token = _state(args).store.rotate_admin()
    print(token)
    print("admin token (re)issued; any previous admin token no longer works", file=sys.stderr)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from .models import PromoteError, serve_aliases, serve_head
    from .publish import gate_dirs, refusal

    state = _state(args)
    try:
        if args.from_mlflow_alias:
            if state.recorder is None:
                print(f"{PROG}: error: MLflow tracking is off", file=sys.stderr)
                return 1
            result = serve_aliases(state.store, *state.recorder.alias_targets())
        elif args.head_version is not None:
            result = serve_head(state.store, args.head_version)
        elif args.package_dir and (args.gate_dir or gate_dirs(state.config) or args.force):
            gates = [str(Path(d).resolve()) for d in args.gate_dir] if args.gate_dir else gate_dirs(state.config)
            tolerance = args.tolerance if args.tolerance is not None else float(state.config["GATE_TOLERANCE"])
            result = promote_dir(state, Path(args.package_dir), gates, tolerance, args.force)
            _flush(state, quiet=args.no_tracking)
            print(json.dumps(result))
            if not result["promoted"]:
                print(f"{PROG}: error: {refusal(result)}; production unchanged", file=sys.stderr)
            return 0 if result["promoted"] else 1
        elif args.package_dir:
            result = promote_dir(state, Path(args.package_dir), [], 0.0, False)
        else:
            raise UsageError("give PACKAGE_DIR, --head-version or --from-mlflow-alias")
    except PromoteError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    _flush(state, quiet=args.no_tracking)
    return 0


def _flush(state, quiet: bool = False) -> None:
    if state.tracker is None or quiet:
        return
    result = state.tracker.drain()
    if result.get("error"):
        print(f"MLflow not updated yet (the server retries): {result['error']}", file=sys.stderr)


def cmd_aggregate(args: argparse.Namespace) -> int:
    from .aggregate import Strategy

    strategy = Strategy.from_dict(parse_strategy(args.strategy)) if args.strategy else None  # before touching the store
    state = _state(args)
    if strategy is not None:
        state.strategy = strategy
    result = state.aggregate(args.min_updates)
    if result is None:
        print(json.dumps({"aggregated": False, "buffered": state.store.buffered_count()}))
        return 0
    print(json.dumps({"aggregated": True, "aggregation_id": result.aggregation_id, "head_version": result.new_head_version,
                      "n_updates": result.n_updates, "devices": len(result.devices), "seconds": round(result.seconds, 4)}))
    _flush(state, quiet=args.no_tracking)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = _state(args)
    serving = state.store.serving()
    out = {
        "serving": None if serving is None else {"package_version": serving.package_version, "head_version": serving.head_version},
        "updates": state.store.counts(),
        "devices": sum(1 for c in state.store.list_clients() if c["kind"] == "device" and not c["revoked_at"]),
        "tracking": state.tracker.status() if state.tracker else None,
    }
    print(json.dumps(out, indent=1))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    state = _state(args)
    if state.tracker is None:
        print("MLflow tracking is off", file=sys.stderr)
        return 1
    result = state.tracker.drain()
    print(json.dumps(result))
    return 1 if result.get("error") else 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_verbose(p)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_device, _add_crops, _add_admin_token, _add_promote, _add_aggregate, _add_status):
        add(sub)
    return p


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="serve the API (gunicorn, gthread workers)")
    _common(r)
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8080)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--threads", type=int, default=16)
    r.add_argument("--aggregate-k", type=int, help="step once K updates are buffered (default 10)")
    r.add_argument("--gate-dir", action="append", help="held-out ImageFolder set published packages are judged on "
                                                        "(repeatable; the first decides; default: $INFANTINO_GATE_DIRS)")
    r.add_argument("--gate-tolerance", type=float, help="accuracy a published package may lose on the first set and "
                                                        "still pass (default 0)")
    r.add_argument("--strategy", help='JSON, e.g. {"rule": "trimmed_mean", "clip_norm": "median"}')
    r.add_argument("--access-log", action="store_true")
    r.add_argument("--dev", action="store_true", help="werkzeug's threaded development server instead of gunicorn")
    r.add_argument("--default-package", metavar="DIR", help=f"package a store that serves nothing yet starts with "
                                                           f"(default: ${DEFAULT_PACKAGE_ENV}, else ./data/models, else the installed release)")
    r.add_argument("--no-default-package", action="store_true",
                   help="start with nothing served: devices get 503 until `promote`")
    r.set_defaults(func=cmd_run)


def _add_device(sub) -> None:
    d = sub.add_parser("device", help="add, list or revoke devices")
    dsub = d.add_subparsers(dest="action", required=True)
    for action in ("add", "revoke", "purge"):
        a = dsub.add_parser(action)
        _common(a)
        a.add_argument("name")
        a.set_defaults(func=cmd_device, action=action)
    ls = dsub.add_parser("list")
    _common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_device, action="list")


def _add_crops(sub) -> None:
    c = sub.add_parser("crops", help="consented face crops: list them, export them for fine-tuning")
    csub = c.add_subparsers(dest="action", required=True)
    cl = csub.add_parser("list")
    _common(cl)
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(func=cmd_crops, action="list")
    ce = csub.add_parser("export")
    _common(ce)
    ce.add_argument("out", help="folder to write <class>/<device>-<id>.png into")
    ce.add_argument("--device", help="only this device's crops")
    ce.set_defaults(func=cmd_crops, action="export")


def _add_admin_token(sub) -> None:
    t = sub.add_parser("admin-token", help="issue (or rotate) the admin token")
    _common(t)
    t.set_defaults(func=cmd_admin_token)


def _add_promote(sub) -> None:
    pr = sub.add_parser("promote", help="serve a model package (or roll back to a head version)")
    _common(pr)
    pr.add_argument("package_dir", nargs="?")
    pr.add_argument("--head-version", type=int, help="serve this existing head version (a rollback)")
    pr.add_argument("--from-mlflow-alias", action="store_true",
                    help="serve what the 'production' aliases of infantino-extractor / infantino-head name in MLflow")
    pr.add_argument("--gate-dir", action="append", help="held-out ImageFolder set: promote only if the package is not "
                                                         "worse than the served one on the first (repeatable)")
    pr.add_argument("--tolerance", type=float, help="accuracy the package may lose and still pass the gate "
                                                    "(default: $INFANTINO_GATE_TOLERANCE or 0)")
    pr.add_argument("--force", action="store_true", help="promote even without or against the gate (recorded)")
    pr.add_argument("--no-tracking", action="store_true", help="leave the MLflow logging to the server")
    pr.set_defaults(func=cmd_promote)


def _add_aggregate(sub) -> None:
    ag = sub.add_parser("aggregate", help="aggregate the buffered updates now")
    _common(ag)
    ag.add_argument("--min-updates", type=int, default=1)
    ag.add_argument("--strategy", help="JSON strategy for this step only")
    ag.add_argument("--no-tracking", action="store_true")
    ag.set_defaults(func=cmd_aggregate)


def _add_status(sub) -> None:
    s = sub.add_parser("status", help="what is served, buffered, pending for MLflow")
    _common(s)
    s.set_defaults(func=cmd_status)
    f = sub.add_parser("flush-tracking", help="log pending aggregations and packages to MLflow now")
    _common(f)
    f.set_defaults(func=cmd_flush)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: args.func(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
