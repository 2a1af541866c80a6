"""Write a cell's network as ONNX or as a self-contained PyTorch program, and prove it.

Every export is checked after writing: the written file is loaded back (onnxruntime, or
``torch.export.load``) and its output on a random batch must match the PyTorch network
within a tolerance relative to the output's scale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..atomic import atomic_paths, check_writable
from ..errors import UserError
from .cells import Cell
from .network import Network, NetworkConfig

FORMATS = ("onnx", "torch")
SUFFIXES = {".onnx": "onnx", ".pt2": "torch"}  # the extension each format's file carries
ONNX_OPSET = 18
# Two runtimes add in different orders, so float32 rounding grows with the logits, and an
# untrained network's logits reach 4.9e6 (cell 3948). Over 19 cells (ranks 1-5 of the
# quick start's search and 14 NB201 indices, default config) onnxruntime differed from
# PyTorch by at most 4.3e-7 x max|logit| (3.6 float32 epsilons): RTOL leaves 20x headroom,
# while a wrong weight or operation is off by the order of the logits themselves. ATOL
# covers networks whose logits all sit near zero.
RTOL = 1e-5
ATOL = 1e-5
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportCheckError(RuntimeError):
    """The written model does not reproduce the PyTorch network's output."""


Predict = Callable[[torch.Tensor], torch.Tensor]  # a loaded export: images -> logits
# Checks a loaded export beyond the random-batch comparison; returns figures to report and
# raises ExportCheckError to refuse the file.
Validate = Callable[[Predict], dict]


@dataclass(frozen=True)
class ExportResult:
    format: str
    paths: tuple[Path, ...]
    max_abs_diff: float
    allowed_diff: float  # ATOL + RTOL * max|PyTorch output| on the check batch
    checks: dict = field(default_factory=dict)


def build_network(cell: Cell, config: NetworkConfig, seed: int = 0) -> Network:
    """A freshly initialised network in eval mode; the seed fixes its weights."""
    config.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Network(cell, config)
    return net.eval()


def describe(cell: Cell, config: NetworkConfig) -> dict:
    """What a consumer of an exported model needs to know, JSON-ready."""
    return {
        "producer": f"metad2a {__version__}",
        "cell": str(cell),
        "nb201_index": cell.index,
        **asdict(config),
        "input": {"name": INPUT_NAME, "shape": ["batch", config.in_channels, *config.input_size]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", config.num_classes]},
    }


def _check_batch(config: NetworkConfig, seed: int) -> torch.Tensor:
    # 3 images, not the 2 used to trace, so the check also exercises the dynamic batch.
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(3, config.in_channels, *config.input_size, generator=g)


def _example_batch(config: NetworkConfig) -> torch.Tensor:
    return torch.zeros(2, config.in_channels, *config.input_size)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The ONNX exporter logs its progress and optional-package notices; users want neither.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def compare(output: torch.Tensor, reference: torch.Tensor, what: str) -> tuple[float, float]:
    """(max abs difference, allowed difference); raises ExportCheckError beyond it."""
    output, reference = output.float(), reference.float()
    diff = float((output - reference).abs().max())
    allowed = ATOL + RTOL * float(reference.abs().max())
    if not diff <= allowed:  # also catches NaN
        raise ExportCheckError(
            f"{what} output differs from PyTorch by {diff:.3g} (allowed {allowed:.3g}, "
            f"{RTOL:g} of the output's scale); the file was not written"
        )
    return diff, allowed


def export_onnx(
    net: nn.Module, path: Path, seed: int = 0, meta: dict | None = None, validate: Validate | None = None,
    overwrite: bool = True,
) -> ExportResult:
    import onnx
    import onnxruntime as ort

    meta = {**describe(net.cell, net.config), **(meta or {})}
    batch = torch.export.Dim("batch", min=1)
    with atomic_paths(path, overwrite=overwrite) as (tmp,), _quiet_exporter():
        program = torch.onnx.export(
            net,
            (_example_batch(net.config),),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
        model = program.model_proto
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key = key
            entry.value = value if isinstance(value, str) else json.dumps(value)
        model.producer_name = "metad2a"
        model.producer_version = __version__
        onnx.save_model(model, str(tmp))

        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

        def predict(x: torch.Tensor) -> torch.Tensor:
            (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
            return torch.from_numpy(out)

        diff, allowed, checks = _check(net, predict, seed, "onnxruntime", validate)
    return ExportResult("onnx", (path,), diff, allowed, checks)


def torch_sidecars(path: Path) -> tuple[Path, Path]:
    """The weights and description files written beside a PyTorch program."""
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def export_torch(
    net: nn.Module, path: Path, seed: int = 0, meta: dict | None = None, validate: Validate | None = None,
    overwrite: bool = True,
) -> ExportResult:
    from safetensors.torch import save_file

    weights_path, json_path = torch_sidecars(path)
    if path in (weights_path, json_path):
        raise UserError(f"{path}: give the PyTorch program a .pt2 name, e.g. model.pt2")
    meta = {**describe(net.cell, net.config), **(meta or {})}
    meta["files"] = {"program": path.name, "weights": weights_path.name}
    meta["load"] = f"torch.export.load('{path.name}').module()"
    batch = torch.export.Dim("batch", min=1)
    with atomic_paths(path, weights_path, json_path, overwrite=overwrite) as (tmp, tmp_weights, tmp_json):
        with _quiet_exporter():
            program = torch.export.export(
                net, (_example_batch(net.config),), dynamic_shapes={"x": {0: batch}}
            )
        torch.export.save(program, str(tmp))
        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp_weights), metadata={"cell": str(net.cell)})
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")

        loaded = torch.export.load(str(tmp)).module()
        diff, allowed, checks = _check(net, loaded, seed, "the saved PyTorch program's", validate)
    return ExportResult("torch", (path, weights_path, json_path), diff, allowed, checks)


def _check(
    net: nn.Module, predict: Predict, seed: int, what: str, validate: Validate | None
) -> tuple[float, float, dict]:
    x = _check_batch(net.config, seed)
    with torch.no_grad():
        diff, allowed = compare(predict(x), net(x), what)
        return diff, allowed, (validate(predict) if validate is not None else {})


def format_for(path: Path, fmt: str | None) -> str:
    """The format to write ``path`` in: ``fmt`` (any case), else the one its extension names,
    else onnx. A known extension that names the other format is refused: a torch program
    called model.onnx would fail wherever it is opened."""
    named = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        return named or "onnx"
    if fmt.lower() not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fmt = fmt.lower()
    if named not in (None, fmt):
        raise UserError(f"{path.name} has the extension of the {named} format, but the format is {fmt}: "
                        "change the extension or the format")
    return fmt


def export_network(
    net: nn.Module, fmt: str, path: Path, seed: int = 0, meta: dict | None = None, validate: Validate | None = None,
    overwrite: bool = True,
) -> ExportResult:
    """Write ``net`` (a ``Network`` or anything with its ``cell`` and ``config``) and check it.

    ``overwrite=False`` refuses to replace any existing file the export would write."""
    fmt = format_for(path, fmt)
    check_writable(path, overwrite)
    return (export_onnx if fmt == "onnx" else export_torch)(net, path, seed, meta, validate, overwrite)
