from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import console, err_console, print_class_notes, print_json


def search(
    root: Path = typer.Argument(..., help="ROOT/<class>/<images>, or a .csv/.json list of (path, label)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="How many ranked cells to show."),
    num_candidates: int = typer.Option(None, "--num-candidates", help="Unique cells to generate and rank, at most (default 500; sampling stops after 2,000 draws; --exhaustive ranks all 15,625)."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Score all 15,625 cells instead of sampling."),
    num_samples: int = typer.Option(20, "--num-samples", "-n", help="Images per class fed to the set encoder."),
    seed: int = typer.Option(0, "--seed", help="Seeds the image sample and the generator."),
    device: str = typer.Option("auto", "--device", help="Where images are encoded: auto, cpu or cuda."),
    weights: str = typer.Option(None, "--weights", help="A checkpoint folder or hf://ORG/REPO[@REV] (default: the published weights)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the feature cache."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Find NAS-Bench-201 cells for an image dataset, with no search training on it.

    Encodes a sample of each class, generates candidate cells from the dataset's
    embedding, ranks them with the meta-performance predictor, prints the best and saves
    the run (`metad2a export --run last` uses it).

    Example: metad2a search ./my_images --top-k 5
    """
    from ..data.encoder import check_device
    from ..data.features import encode_folder
    from ..data.images import summarize
    from ..meta.runs import save_run
    from ..meta.search import SearchModel, check_options
    from ..meta.weights import check_encoder, resolve_weights

    from ..errors import UserError

    if exhaustive and num_candidates is not None:
        raise UserError("--exhaustive ranks all 15,625 cells; leave out --num-candidates")
    num_candidates = 500 if num_candidates is None else num_candidates
    check_options(top_k, num_candidates, seed)  # before the weights and the images
    check_device(device)
    if not root.exists():  # before the weights, which may come from the Hub
        raise UserError(f"{root} does not exist")
    t0 = time.perf_counter()
    ckpt = resolve_weights(weights, log=lambda line: err_console.print(line, highlight=False))
    resolution = int(ckpt.config["encoder"]["resolution"])
    model = SearchModel.load(ckpt.path, ckpt.config)
    feats = encode_folder(root, num_samples, seed, device, cache=not no_cache, resolution=resolution)
    check_encoder(ckpt.config, feats.encoder, resolution=resolution)
    t_encode = time.perf_counter() - t0
    result = model.search(feats.features, top_k, num_candidates, exhaustive, seed)
    result.timings = {"encode": t_encode, **result.timings}
    document = {
        **result.to_dict(),
        "dataset": {
            "root": str(Path(root).resolve()),
            "num_classes": feats.num_classes,
            "classes": feats.classes,
            "dropped_classes": feats.dropped_classes,
            "num_samples": num_samples,
            "files": feats.files,
        },
        "weights": {"source": ckpt.source, "path": str(ckpt.path), "name": ckpt.config.get("name"), "sha256": model.identity},
        "seed": seed,
    }
    run_id, _ = save_run(document)
    document = {"id": run_id, **document}
    if as_json:
        print_json(document)
        return

    from rich.table import Table

    skipped = summarize(feats.skipped)
    if skipped:
        err_console.print(skipped, highlight=False)
    print_class_notes(feats, short_too=False)  # a search samples up to --num-samples: fewer is no news
    table = Table(title=f"{feats.num_classes} classes, {result.candidates} candidates ({result.mode})")
    for col in ("rank", "cell", "NB201", "pred. acc.", "params (M)", "MFLOPs"):
        # The cell string is the answer: wrap it rather than cut it on narrow terminals.
        table.add_column(col, justify="left" if col == "cell" else "right", overflow="fold")
    for r in result.ranking:
        table.add_row(str(r.rank), r.cell, str(r.nb201_index), f"{r.predicted_accuracy:.2f}",
                      f"{r.params / 1e6:.3f}", f"{r.flops / 1e6:.1f}")
    console.print(table)
    t = result.timings
    console.print(
        f"encode {t['encode']:.2f}s · generate {t['generate']:.2f}s · rank {t['rank']:.2f}s · saved run {run_id}",
        highlight=False,
    )
