"""The fine-tuning recipe's pieces: mixup's plan and the protocol's workstation folds."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO

torch = pytest.importorskip("torch")

from infantino.export.train import mix_plan  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from infant_cv import finetuned, parse_args, workstation_mask  # noqa: E402


def test_mixup_off_leaves_the_batch_alone():
    assert mix_plan(32, 0.0, torch.Generator().manual_seed(0)) == (1.0, None)
    assert mix_plan(1, 0.4, torch.Generator().manual_seed(0)) == (1.0, None)


def test_mixup_pairs_every_sample_and_keeps_its_own_label_dominant():
    lams = []
    for seed in range(50):
        lam, perm = mix_plan(16, 0.2, torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(16))
        lams.append(lam)
    assert min(lams) >= 0.5 and max(lams) <= 1.0
    assert np.mean(lams) < 0.95  # Beta(0.2, 0.2) mixes some batches strongly
    a = mix_plan(16, 0.2, torch.Generator().manual_seed(3))
    b = mix_plan(16, 0.2, torch.Generator().manual_seed(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])  # seeded: a resumed epoch mixes the same way


def test_workstation_learns_from_all_but_the_test_fold_or_also_leaves_the_device_fold_out():
    folds = np.repeat(np.arange(5), 4)
    three = workstation_mask(folds, 4, 5, "3folds")
    assert set(folds[three]) == {1, 2, 3}  # fold 0 is test fold 4's device stream
    assert set(folds[workstation_mask(folds, 4, 5, "all")]) == {0, 1, 2, 3}


def test_a_recipe_other_than_the_release_says_how_it_differs():
    assert finetuned(parse_args([])) == "fine-tuned extractor"
    name = finetuned(parse_args(["--ft-mixup", "0.2", "--workstation", "all"]))
    assert "mixup 0.2" in name and "workstation 4 folds" in name
    with pytest.raises(SystemExit):
        parse_args(["--finetune-only"])  # needs the face finding named


def test_another_training_seed_keeps_the_fer_held_out_split_packages_score_on():
    from conftest import require_data
    from infantino.export.train import TrainConfig, split_data

    fer = require_data("fer2013", "fer2013_train.npz")
    cfg = TrainConfig(fer=str(fer), out="unused", limit=700)
    val0 = split_data(cfg)[1]
    val1 = split_data(TrainConfig(fer=str(fer), out="unused", limit=700, seed=1))[1]
    assert np.array_equal(val0.pixels, val1.pixels) and np.array_equal(val0.labels, val1.labels)
    assert not np.array_equal(split_data(TrainConfig(fer=str(fer), out="unused", limit=700, split_seed=1))[1].labels, val0.labels)


def test_a_weight_average_of_two_checkpoints_lies_between_them(tmp_path):
    from infantino.export.train import average_checkpoints

    a = {"model": {"w": torch.zeros(3), "n": torch.tensor(1)}, "ema": {"w": torch.ones(3)}, "history": [1], "epoch": 3}
    b = {"model": {"w": torch.full((3,), 2.0), "n": torch.tensor(7)}, "ema": {"w": torch.full((3,), 3.0)}, "history": [2], "epoch": 3}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "soup" / "c.pt")
    c = torch.load(tmp_path / "soup" / "c.pt", weights_only=False)
    assert torch.equal(c["model"]["w"], torch.ones(3)) and torch.equal(c["ema"]["w"], torch.full((3,), 2.0))
    assert int(c["model"]["n"]) == 1 and c["epoch"] == 3 and len(c["soup_of"]) == 2  # integer buffers from the first


def test_soup_from_the_command_line_and_a_foreign_network_refused_in_one_line(tmp_path, capsys):
    from infantino.export.cli import main as export_main

    a = {"model": {"w": torch.zeros(3)}, "ema": {"w": torch.zeros(3)}}
    b = {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}}
    other = {"model": {"w": torch.ones(4)}, "ema": {"w": torch.ones(4)}}
    for name, state in (("a", a), ("b", b), ("other", other)):
        torch.save(state, tmp_path / f"{name}.pt")
    assert export_main(["soup", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "c.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=False)["ema"]["w"], torch.full((3,), 0.5))
    capsys.readouterr()
    assert export_main(["soup", str(tmp_path / "a.pt"), str(tmp_path / "other.pt"), "--out", str(tmp_path / "d.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "does not hold the same network" in err and len(err.splitlines()) == 1 and not (tmp_path / "d.pt").exists()
