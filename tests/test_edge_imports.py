"""The device stays light: no training or server frameworks, and no SciPy/scikit-learn on the hot path."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import REPO, TESTS

HEAVY = ["torch", "timm", "mlflow", "flask", "matplotlib"]


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({'.'.join(m.split('.')[:2]) if m.startswith('infantino.') else m.split('.')[0] for m in sys.modules})))\n"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_importing_edge_runtime_imports_no_training_or_server_framework():
    loaded = _modules_after(
        "import infantino.edge_runtime, infantino.edge_runtime.device, infantino.edge_runtime.cli, infantino.edge_runtime.evaluate, infantino.edge_runtime.core.extractor, "
        "infantino.edge_runtime.state, infantino.edge_runtime.core.replay, infantino.edge_runtime.core.uncertainty, infantino.edge_runtime.annotation_queue, infantino.edge_runtime.core.head"
    )
    assert not loaded & set(HEAVY)


def test_a_device_that_predicts_and_learns_never_imports_sklearn_or_scipy(tiny_package_dir, tmp_path):
    # scikit-learn pulls in SciPy (~90 MB RSS); the device runs the MLP's math in numpy (see head.py).
    loaded = _modules_after(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from edge_helpers import face, open_device
        device = open_device({str(tiny_package_dir)!r}, {str(tmp_path / 'state')!r}, uncertainty_threshold=0.0)
        p = device.predict(face(1))
        device.learn(face(1), "sad")
        device.resolve(p.queued_id, "sad")
    """))
    assert "infantino.edge_runtime" in loaded and "onnxruntime" in loaded
    assert not loaded & {"sklearn", "scipy", *HEAVY}
