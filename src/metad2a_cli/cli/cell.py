from __future__ import annotations

import typer

from .common import console, print_json


def cell(
    arch: str = typer.Argument(..., help="A cell string or an NB201 index (0..15624)."),
    num_classes: int = typer.Option(10, "--num-classes", help="Classes of the network's head."),
    channels: int = typer.Option(16, "--channels", help="Width C of the first stage."),
    cells: int = typer.Option(5, "--cells", help="Cells per stage N."),
    input_size: tuple[int, int] = typer.Option((32, 32), "--input-size", help="Input height and width."),
    in_channels: int = typer.Option(3, "--in-channels", help="Image channels: 1 or 3."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Show a NAS-Bench-201 cell: canonical string, NB201 index, parameters and FLOPs.

    Example: metad2a cell '|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|'
    """
    from ..nb201.cells import Cell
    from ..nb201.cost import cell_cost
    from ..nb201.network import NetworkConfig

    c = Cell.from_any(arch)
    config = NetworkConfig(num_classes, channels, cells, in_channels, tuple(input_size))
    config.validate()
    cost = cell_cost(c, num_classes, channels, cells, in_channels, tuple(input_size))
    info = {
        "cell": str(c),
        "nb201_index": c.index,
        "ops": list(c.op_names),
        "params": cost.params,
        "flops": cost.flops,
    }
    if as_json:
        print_json(info)
        return
    console.print(f"cell        {c}", highlight=False)
    console.print(f"nb201 index {c.index}")
    console.print(f"params      {cost.params_m:.6f} M  (C={channels}, N={cells}, {num_classes} classes)")
    console.print(f"FLOPs       {cost.mflops:.5f} M  ({input_size[0]}x{input_size[1]} input)")
