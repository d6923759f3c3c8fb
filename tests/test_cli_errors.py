"""Bad input on every ``infantino-*`` command: one line on stderr, a non-zero exit, no traceback
unless ``-v`` asks for it. One exit-code convention for the four: 2 for a command line that is
wrong, 1 for a command that failed. Run as the console scripts run (``python -m <module>``)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

MODULES = {"server": "infantino.sync_server.cli", "export": "infantino.export.cli", "demo": "infantino.fleet_demo.cli", "edge": "infantino.edge_runtime.cli"}


def _run(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in UNSET}
    return subprocess.run([sys.executable, "-m", MODULES[tool], *args], capture_output=True, text=True, cwd=REPO,
                          env={**base, **(env or {})}, timeout=120)


SERVER = ["--data-dir", "{tmp}/d", "--mlflow-uri", "off"]
CASES = [
    ("server", ["aggregate", *SERVER, "--strategy", '{"rule": "no-such-rule"}'], 1, "--strategy: unknown rule 'no-such-rule'"),
    ("server", ["aggregate", *SERVER, "--strategy", '{"rule": "median", "speed": 3}'], 1, "unknown strategy settings: speed"),
    ("server", ["run", *SERVER, "--strategy", "{bad"], 1, "--strategy is not valid JSON"),
    ("server", ["run", *SERVER, "--strategy", "[1, 2]"], 1, "--strategy must be a JSON object"),
    ("server", ["status", *SERVER, "--db-url", "nosuch://x"], 1, "NoSuchModuleError"),
    ("server", ["promote", *SERVER, "{tmp}/no-package"], 1, "no manifest.json"),
    ("server", ["launch"], 2, "invalid choice: 'launch'"),
    ("server", ["promote", *SERVER], 2, "give PACKAGE_DIR, --head-version or --from-mlflow-alias"),
    ("export", ["train", "--fer", "{tmp}/fer.npz", "--out", "{tmp}/run"], 1, "FER2013 (fer2013_train.npz) not found at"),
    ("export", ["onnx", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/pkg"], 1, "none.pt"),
    ("export", ["publish", "{tmp}/pkg", "--server", "http://127.0.0.1:9", "--admin-token", "x"], 1, "pkg"),
    ("export", ["publish", "{tmp}/pkg", "--server", "http://127.0.0.1:9"], 2, "give --admin-token or set INFANTINO_ADMIN_TOKEN"),
    ("export", ["launch"], 2, "invalid choice: 'launch'"),
    ("demo", ["--images", "{tmp}/photos"], 1, "no image folder at"),
    ("demo", ["--rounds", "many"], 2, "invalid int value: 'many'"),
    ("edge", ["predict", "{tmp}/frame.jpg"], 1, "no such image file"),
    ("edge", ["sync", "--server", "http://127.0.0.1:9"], 2, "give --token or set INFANTINO_DEVICE_TOKEN"),
    ("edge", ["launch"], 2, "invalid choice: 'launch'"),
]
UNSET = ("INFANTINO_ADMIN_TOKEN", "INFANTINO_DEVICE_TOKEN")  # the usage cases leave these options out


@pytest.mark.parametrize("tool, argv, code, message", CASES, ids=[f"{c[0]}-{c[1][0]}-{c[3][:24]}" for c in CASES])
def test_bad_input_is_one_line_and_a_non_zero_exit(tool, argv, code, message, tmp_path):
    r = _run(tool, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "\n" not in err and "Traceback" not in err, err[-2000:]
    assert err.startswith(f"infantino-{tool}: error: ") and message in err, err


def test_every_command_exits_2_for_a_wrong_command_line_and_1_for_a_failure():
    codes = {(tool, code) for tool, _, code, _ in CASES}
    assert codes == {(tool, c) for tool in MODULES for c in (1, 2)}  # the table above covers the convention


def test_verbose_adds_the_traceback_after_the_same_line(tmp_path):
    argv = ["aggregate", "--strategy", '{"rule": "no-such-rule"}', "--data-dir", str(tmp_path), "--mlflow-uri", "off"]
    for verbose in (["-v", *argv], [*argv, "-v"]):  # before or after the sub-command
        r = _run("server", *verbose)
        assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("infantino-server: error: --strategy: unknown rule")


def test_a_machine_without_the_postgres_driver_is_told_which_extra_to_install(tmp_path):
    # The driver is installed here (the postgres extra); block its import as on a machine without it.
    code = ("import sys; sys.modules['psycopg2'] = None\n"
            "from infantino.sync_server.cli import main\n"
            f"sys.exit(main(['status', '--db-url', 'postgresql+psycopg2://u:p@127.0.0.1:1/db', '--data-dir', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == "infantino-server: error: the PostgreSQL driver is not installed: pip install 'infantino-edge[postgres]'"
