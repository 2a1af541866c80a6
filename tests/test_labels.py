from dataclasses import replace

import numpy as np
import pytest
import torch
from test_fit import make_folder

from metad2a_cli.data.images import read_image_folder
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.nb201.network import NetworkConfig
from metad2a_cli.training import recipe
from metad2a_cli.training import trainer as trainer_mod
from metad2a_cli.training.ensemble import CellEnsemble
from metad2a_cli.training.fit import start_fit
from metad2a_cli.training.fitdata import split_and_decode
from metad2a_cli.training.labels import label_cells
from metad2a_cli.training.schedule import LabelSchedule
from metad2a_cli.training.trainer import FitSettings, new_network

RESNET = Cell.parse("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|")
CELLS = [
    RESNET,
    Cell.parse("|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|"),
    Cell((0,) * 6),
    Cell((3,) * 6),
]
CONFIG = NetworkConfig(num_classes=5, channels=4, cells_per_stage=2, input_size=(16, 16))
SCHEDULE = LabelSchedule(epochs=3, channels=4, cells_per_stage=1, input_size=16)


def networks(cells, seed=0):
    return [new_network(c, CONFIG, [0.5] * 3, [0.25] * 3, seed) for c in cells]


@pytest.mark.parametrize("training", [True, False])
def test_ensemble_computes_what_each_network_computes(training):
    nets = networks(CELLS)
    ens = CellEnsemble(nets).train(training)
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        out = ens(x)
        assert out.shape == (4, 6, 5)
        for k, net in enumerate(nets):
            torch.testing.assert_close(out[k], net.train(training)(x), atol=1e-5, rtol=1e-4)


def test_ensemble_trains_in_bfloat16():
    ens = CellEnsemble(networks(CELLS[:2]))  # cells that share some edges' ops and not others
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ens(torch.rand(4, 3, 16, 16)).float().logsumexp(-1).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ens.parameters())


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("task"), per_class=12)
    _, train, val, _ = split_and_decode(read_image_folder(root), 0.25, 16, seed=0)
    return root, train, val


def test_a_label_is_what_fit_reports(task, tmp_path):
    root, train, val = task
    schedule = replace(SCHEDULE, lr=0.03)  # not fit's default: the label must train at its schedule's rate
    labels = label_cells(CELLS[:3], train, val, schedule, seed=0, device=torch.device("cpu"))
    for cell, label in zip(CELLS[:3], labels):
        settings = FitSettings(cell=str(cell), channels=4, cells_per_stage=1, input_size=16, epochs=3, lr=0.03,
                               val_fraction=0.25, seed=0, augment=schedule.augment)
        fitted = start_fit(root, settings, tmp_path / str(cell.index), device="cpu")
        curve = [e["val_acc"] for e in fitted.state.history]
        assert label.curve == pytest.approx(curve, abs=100.0 / len(val) + 1e-9)  # at most one image apart
        assert label.accuracy == max(label.curve) and label.curve[label.best_epoch - 1] == label.accuracy


def test_labels_repeat_and_learn(task):
    _, train, val = task
    a = label_cells(CELLS, train, val, SCHEDULE, seed=3, device=torch.device("cpu"))
    b = label_cells(CELLS, train, val, SCHEDULE, seed=3, device=torch.device("cpu"))
    assert a == b
    assert max(label.accuracy for label in a) > 70.0  # chance is 33%
    assert all(len(label.curve) == SCHEDULE.epochs for label in a)


def test_out_of_memory_splits_the_cells_not_the_batch(task, monkeypatch):
    _, train, val = task
    real = trainer_mod.Trainer.train_step
    together = []

    def train_step(self, images, labels):
        together.append(self.model.members)
        if self.model.members > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, images, labels)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", train_step)
    split = label_cells(CELLS[:3], train, val, SCHEDULE, seed=0, device=torch.device("cpu"))
    monkeypatch.undo()
    alone = [label_cells([c], train, val, SCHEDULE, seed=0, device=torch.device("cpu"))[0] for c in CELLS[:3]]
    assert split == alone
    assert {3, 2, 1} <= set(together)
    assert np.all([label.accuracy >= 0 for label in split])


def test_cells_trained_apart_in_turns_get_the_labels_they_get_alone(task, monkeypatch):
    _, train, val = task
    cpu = torch.device("cpu")
    apart = label_cells(CELLS, train, val, SCHEDULE, seed=1, device=cpu, ensemble=False)
    alone = [label_cells([c], train, val, SCHEDULE, seed=1, device=cpu, ensemble=False)[0] for c in CELLS]
    assert apart == alone  # taking turns step by step changes no network's run
    # Grouped and separate convolutions round differently in bfloat16, and three epochs of
    # training amplify that like another seed would: the two are the same fit in float32.
    monkeypatch.setattr(recipe, "computes_bfloat16", lambda device: False)
    apart = label_cells(CELLS, train, val, SCHEDULE, seed=1, device=cpu, ensemble=False)
    together = label_cells(CELLS, train, val, SCHEDULE, seed=1, device=cpu)
    for a, t in zip(apart, together):
        assert a.curve == pytest.approx(t.curve, abs=100.0 / len(val) + 1e-9)  # the same fit, one image at most
    assert len({label.accuracy for label in apart}) > 1  # the cells did not all collapse to one label


def test_bfloat16_where_the_device_computes_it(monkeypatch):
    assert recipe.computes_bfloat16(torch.device("cuda")) and not recipe.computes_bfloat16(torch.device("meta"))
    for avx512_bf16, amx, native in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert recipe.computes_bfloat16(torch.device("cpu")) is native
        net = torch.nn.Linear(4, 2)
        with recipe.autocast(torch.device("cpu")):
            out = net(torch.rand(3, 4))
        assert out.dtype == (torch.bfloat16 if native else torch.float32)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: float32
    assert not recipe.computes_bfloat16(torch.device("cpu"))
