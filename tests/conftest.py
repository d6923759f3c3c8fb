from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infantino.edge_runtime.core.datasets import data_root

TESTS = Path(__file__).parent
REPO = TESTS.parent
DATA = data_root()  # $INFANTINO_DATA, else ../shared/data
pytest_plugins = ["pytester"]  # tests/test_ci_skips.py runs pytest on small files with this conftest

# In CI (``CI`` set, as ``.ci/run`` is run) every skip is a missing install step, service, browser
# or data set, so it fails the run instead of silently guarding nothing. A test that skips for a
# reason that is not the environment would be listed here (reason substrings); none does today.
CI_ALLOWED_SKIPS: tuple[str, ...] = ()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip into a failure that says why, unless the reason is on the allow-list."""
    if not (_in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped in CI, which must provide what it needs: {reason.removeprefix('Skipped: ')} "
                       "(install .[all,dev], run .ci/pg.sh and .ci/browser.sh, data: README 'Data')")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole file at collection
    _fail_skip_in_ci(outcome.get_result())


@pytest.fixture(scope="session")
def tiny_package_dir(tmp_path_factory) -> Path:
    """A real (tiny) model package; copy it before changing anything inside."""
    from infantino.export.tiny_package import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("pkg") / "model")


def source_files() -> list[str]:
    """The files a commit of this working tree holds (tracked, plus untracked that git does not
    ignore), relative to the repository; without git, every file outside caches and build output."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        return sorted(f for f in set(out.split("\0")) if f and (REPO / f).is_file())
    except (OSError, subprocess.CalledProcessError):
        skip = {"__pycache__", ".git", "build", "dist", ".pytest_cache"}
        return sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*")
                      if p.is_file() and not skip & set(p.relative_to(REPO).parts) and ".egg-info" not in str(p))


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The project built as a user's ``pip install .`` builds it (non-editable), from a copy of
    what a clean checkout holds (``source_files``), so that what the wheel holds is what
    pyproject.toml and setup.py derive from the tree, not the checkout's build leftovers."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for rel in source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("*.whl")
    return wheel


@pytest.fixture
def served_app(tmp_path, tiny_package_dir):
    """Make sync-server apps on temp data folders, the tiny package (or ``package``) served, MLflow
    off and no background threads unless ``config`` says otherwise; all closed after the test."""
    from infantino.sync_server import create_app
    from infantino.sync_server.models import promote_package

    made = []

    def make(config: dict | None = None, *, data_dir: Path | None = None, package: Path | None = None):
        folder = data_dir or tmp_path / f"server-{len(made)}"
        app = create_app({"DATA_DIR": str(folder), "MLFLOW_URI": "off", "BACKGROUND": False, **(config or {})})
        state = app.extensions["infantino"]
        made.append(state)
        promote_package(state.store, state.data_dir, package or tiny_package_dir)
        return app

    yield make
    for state in made:
        state.close()


def require_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set INFANTINO_DATA)")
    return path
