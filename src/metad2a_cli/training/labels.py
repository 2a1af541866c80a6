"""Database labels: what `metad2a fit` would report for a cell on a task, many cells at once.

A label is a fit with ``fit``'s recipe, network, batch rule and seed handling, shortened to
the schedule's epoch count: each network starts from the weights ``fit`` would give it,
sees the same batches, and its label is its best validation accuracy over the epochs (what
``fit`` reports). The cells of a task train together as one ``CellEnsemble``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..nb201.cells import Cell
from .ensemble import CellEnsemble
from .fitdata import LabeledImages, channel_stats
from .recipe import default_batch_size
from .schedule import LabelSchedule
from .trainer import FitState, Reporter, Trainer, new_network


@dataclass(frozen=True)
class CellLabel:
    accuracy: float  # best validation accuracy (%), as fit reports it
    best_epoch: int
    curve: list[float]  # validation accuracy after each epoch


class _BatchChanged(Exception):
    """The trainer ran out of memory and would shrink the batch, changing the recipe."""


class _Strict(Reporter):
    wants_steps = False

    def note(self, message: str) -> None:
        raise _BatchChanged(message)


def label_cells(
    cells: Sequence[Cell],
    train: LabeledImages,
    val: LabeledImages,
    schedule: LabelSchedule,
    seed: int,
    device: torch.device,
    cuda_graph: bool = True,
    ensemble: bool = True,
) -> list[CellLabel]:
    """Train every cell's network on ``train`` (uint8 images at the schedule's size) and
    return each one's label. Out of GPU memory, the cells are split into two halves
    rather than the batch shrunk, so a label never depends on how many trained with it.

    ``ensemble``: the cells train as one ``CellEnsemble`` (grouped convolutions); else each
    as its own network, the networks taking turns a step at a time, each on its own CUDA
    stream so that their small kernels can overlap. Either way a label is the same fit."""
    label = _label_together if ensemble else _label_apart
    try:
        return _finish(label(cells, train, val, schedule, seed, device, cuda_graph))
    except (_BatchChanged, torch.cuda.OutOfMemoryError):
        if len(cells) == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(cells) // 2
        return [
            *label_cells(cells[:half], train, val, schedule, seed, device, cuda_graph, ensemble),
            *label_cells(cells[half:], train, val, schedule, seed, device, cuda_graph, ensemble),
        ]


def _finish(curves: list[list[float]]) -> list[CellLabel]:
    """Labels from the validation curves, (epochs, cells)."""
    labels = []
    for k in range(len(curves[0]) if curves else 0):
        curve = [epoch[k] for epoch in curves]
        best = max(range(len(curve)), key=lambda e: (curve[e], -e))  # the earliest best, as fit keeps it
        labels.append(CellLabel(curve[best], best + 1, curve))
    return labels


def _label_together(cells, train, val, schedule, seed, device, cuda_graph) -> list[list[float]]:
    classes = [str(c) for c in range(int(max(train.labels.max(), val.labels.max())) + 1)]
    mean, std = channel_stats(train.images)
    settings = [schedule.fit_settings(c, seed) for c in cells]
    config = settings[0].network_config(len(classes))
    model = CellEnsemble([new_network(c, config, mean, std, seed) for c in cells])
    state = FitState(batch_size=default_batch_size(len(train)))
    # Every cell's settings differ only in the cell, so the first one's recipe is all of theirs.
    trainer = Trainer(settings[0], model, classes, train, val, state, device, _Strict(), cuda_graph=cuda_graph)
    curves: list[list[float]] = []
    while not state.completed:
        trainer.run_epoch()
        evaluations = trainer.evaluate_members()
        trainer.close_epoch(evaluations[0])
        curves.append([ev.accuracy for ev in evaluations])
    return curves


def _label_apart(cells, train, val, schedule, seed, device, cuda_graph) -> list[list[float]]:
    classes = [str(c) for c in range(int(max(train.labels.max(), val.labels.max())) + 1)]
    mean, std = channel_stats(train.images)
    trainers = []
    for cell in cells:
        settings = schedule.fit_settings(cell, seed)
        network = new_network(cell, settings.network_config(len(classes)), mean, std, seed)
        state = FitState(batch_size=default_batch_size(len(train)))
        trainers.append(Trainer(settings, network, classes, train, val, state, device, _Strict(), cuda_graph=cuda_graph))
    if device.type == "cuda":
        streams = [torch.cuda.Stream(device) for _ in trainers]
        for stream in streams:
            stream.wait_stream(torch.cuda.current_stream(device))  # the images copied in above
    else:
        streams = [None] * len(trainers)  # torch.cuda.stream(None) changes nothing
    curves: list[list[float]] = []
    while not trainers[0].state.completed:
        running = [(t.epoch_steps(), s) for t, s in zip(trainers, streams)]
        while running:  # one step of each network in turn, so every stream has work queued
            still = []
            for steps, stream in running:
                with torch.cuda.stream(stream):
                    try:
                        next(steps)
                        still.append((steps, stream))
                    except StopIteration:
                        pass
            running = still
        epoch = []
        for trainer, stream in zip(trainers, streams):
            with torch.cuda.stream(stream):
                evaluation = trainer.evaluate()
                trainer.close_epoch(evaluation)
            epoch.append(evaluation.accuracy)
        curves.append(epoch)
    return curves
