"""The install layout: one namespace of ours (``infantino.*``), no top-level module that another
distribution could own (PyPI has an ``export``), and the device extra without the heavy frameworks."""
from __future__ import annotations

import email
import subprocess
import sys
import sysconfig
import zipfile

HEAVY = ("torch", "timm", "mlflow", "flask")


def test_the_wheel_installs_only_under_the_infantino_namespace(built_wheel):
    names = zipfile.ZipFile(built_wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"infantino"}
    for package in ("edge_runtime", "export", "sync_server", "fleet_demo"):
        assert f"infantino/{package}/__init__.py" in names
    assert "infantino/edge_runtime/annotate/templates/annotate.html" in names  # package data travels
    assert "infantino/__init__.py" not in names  # a namespace package: other distributions of ours may join it


def test_a_fresh_install_provides_no_top_level_export(built_wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(built_wheel)], check=True, capture_output=True, timeout=300)
    # -S: no site processing, so no .pth file installs the checkout's editable finder; the
    # installed wheel first, then site-packages for numpy (read as a plain folder)
    probe = ("import importlib.util, sys\n"
             f"sys.path[:0] = [{str(target)!r}]; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
             "import infantino.edge_runtime.core.wire as w\n"
             "print(w.__file__.startswith(sys.path[0]), [m for m in ('export', 'edge_runtime', 'sync_server', 'fleet_demo')"
             " if importlib.util.find_spec(m) is not None])")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().split(maxsplit=1) == ["True", "[]"]


def test_the_edge_extra_names_no_training_or_server_framework(built_wheel):
    with zipfile.ZipFile(built_wheel) as whl:
        (meta,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        requires = email.message_from_bytes(whl.read(meta)).get_all("Requires-Dist")
    edge = [r for r in requires if "extra == \"edge\"" in r.replace("'", '"')]
    assert edge and not [r for r in edge if r.split()[0].split(">")[0].split("=")[0].lower() in HEAVY]
