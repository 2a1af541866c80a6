from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from .common import console, err_console, print_json


def export(
    output: Path = typer.Option(..., "-o", "--output", help="File to write (.onnx, or .pt2 for torch)."),
    fmt: str = typer.Option(
        None, "--format", "-f", help="onnx or torch (default: the one the output's extension names, else onnx)."
    ),
    arch: str = typer.Option(None, "--arch", help="Cell string or NB201 index to export."),
    run: str = typer.Option(None, "--run", help="A saved search run: its id, 'last', or a run file."),
    rank: int = typer.Option(1, "--rank", help="With --run: which ranked cell (1 = best)."),
    from_fit: Path = typer.Option(
        None, "--from-fit", help="A `metad2a fit` run folder: export its trained network (of a --top-k fit, the winner's)."
    ),
    num_classes: int = typer.Option(None, "--num-classes", help="Classes (default 10, or the run's)."),
    input_size: tuple[int, int] = typer.Option(None, "--input-size", help="Input height and width (default 32 32)."),
    in_channels: int = typer.Option(None, "--in-channels", help="Image channels: 1 or 3 (default 3)."),
    channels: int = typer.Option(None, "--channels", help="Width C of the first stage (default 16)."),
    cells: int = typer.Option(None, "--cells", help="Cells per stage N (default 5)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the (untrained) initial weights."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files (with -f torch, all three)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Write a cell's NAS-Bench-201 network as ONNX or as a PyTorch program.

    The file is checked after writing (onnxruntime or torch.export.load must reproduce
    the PyTorch output within 1e-5 of its scale) and only then moved into place. With --from-fit the
    trained network is written, and it must also classify the fit's validation images as
    the fitted network does; it takes RGB in [0, 1] and normalises inside.

    Examples:
      metad2a export --arch 1462 --format onnx -o model.onnx
      metad2a export --run last --rank 1 --format torch -o model.pt2
      metad2a export --from-fit runs/mine --format onnx -o mine.onnx
    """
    from ..meta.runs import load_run
    from ..nb201.cells import Cell
    from ..nb201.export import build_network, export_network, format_for
    from ..nb201.network import NetworkConfig

    if sum(x is not None for x in (arch, run, from_fit)) != 1:
        raise UserError("give exactly one of --arch, --run or --from-fit")
    if rank != 1 and run is None:
        raise UserError("--rank picks a cell of a saved search: use it with --run")
    fmt = format_for(output, fmt)
    if from_fit is not None:
        given = {"--num-classes": num_classes, "--input-size": input_size, "--in-channels": in_channels,
                 "--channels": channels, "--cells": cells}
        named = [flag for flag, v in given.items() if v is not None]
        if named:
            raise UserError(f"{named[0]} comes from the fit with --from-fit; leave it out")
        _export_fitted(from_fit, fmt, output, force, as_json)
        return
    if run is not None:
        saved = load_run(run)
        cell = saved.at_rank(rank)
        num_classes = saved.num_classes if num_classes is None else num_classes
    else:
        cell = Cell.from_any(arch)
    config = NetworkConfig(
        num_classes=10 if num_classes is None else num_classes,
        channels=16 if channels is None else channels,
        cells_per_stage=5 if cells is None else cells,
        in_channels=3 if in_channels is None else in_channels,
        input_size=(32, 32) if input_size is None else tuple(input_size),
    )
    net = build_network(cell, config, seed)
    with err_console.status(f"Exporting {fmt} and checking it..."):
        result = export_network(net, fmt, output, seed, overwrite=force)
    _report(
        result,
        {"cell": str(cell), "nb201_index": cell.index},
        f"cell {cell} (NB201 #{cell.index}); output matches PyTorch "
        f"(max abs diff {result.max_abs_diff:.1e}, allowed {result.allowed_diff:.1e})",
        as_json,
    )


def _export_fitted(run_dir: Path, fmt: str, output: Path, force: bool, as_json: bool) -> None:
    from ..training.fit import export_fitted
    from ..training.halving import fitted_run_dir

    with err_console.status(f"Exporting {fmt} and checking it on the validation images..."):
        result = export_fitted(fitted_run_dir(run_dir), fmt, output, overwrite=force)
    c = result.checks
    _report(
        result,
        {},
        f"validation accuracy {c['val_acc_exported']:.2f}% exported, {c['val_acc_fitted']:.2f}% fitted network "
        f"({c['val_images']:,} images, {c['val_flipped_near_ties']} near-tie flips); "
        f"random batch max abs diff {result.max_abs_diff:.1e} (allowed {result.allowed_diff:.1e})",
        as_json,
    )


def _report(result, fields: dict, summary: str, as_json: bool) -> None:
    if as_json:
        print_json({"format": result.format, "files": [str(p) for p in result.paths], **fields,
                    "max_abs_diff": result.max_abs_diff, "allowed_diff": result.allowed_diff, **result.checks})
        return
    for p in result.paths:
        console.print(f"wrote {p}", highlight=False)
    console.print(summary, highlight=False)
