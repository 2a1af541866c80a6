from __future__ import annotations

from pathlib import Path

import typer

from .common import console, err_console, lazy_progress, print_class_notes, print_json


def encode(
    root: Path = typer.Argument(..., help="ROOT/<class>/<images>, or a .csv/.json list of (path, label)."),
    output: Path = typer.Option(..., "-o", "--output", help="Features file to write (.safetensors)."),
    num_samples: int = typer.Option(20, "--num-samples", "-n", help="Images per class."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-class sample."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the feature cache."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every skipped file and why."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Embed a labeled image folder: per-class EfficientNet-Lite0 features, as safetensors.

    Samples --num-samples images per class (reproducibly, with --seed),
    skips files that are not usable images (one summary line; --verbose
    lists them) and caches each image's feature, so a second run over the
    same folder is near-instant.

    Example: metad2a encode photos/ -o photos.safetensors --num-samples 20
    """
    import warnings

    from PIL import Image
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from ..atomic import check_writable
    from ..data.features import encode_folder
    from ..data.images import summarize

    check_writable(output, overwrite=force)  # before the encoding, not after it
    # Oversized files are reported as skipped; PIL's own warning about them would repeat it.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    bars = lazy_progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        feats = encode_folder(root, num_samples, seed, device, cache=not no_cache, progress=progress)
    feats.save(output, overwrite=force)

    summary = summarize(feats.skipped)
    info = {
        "output": str(output),
        "encoder": feats.encoder,
        "classes": feats.num_classes,
        "images": sum(feats.counts),
        "per_class": dict(zip(feats.classes, feats.counts)),
        "short_classes": feats.short_classes,
        "dropped_classes": feats.dropped_classes,
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in feats.skipped],
        "cache_hits": feats.stats.cache_hits,
        "decoded": feats.stats.decoded,
    }
    if as_json:
        print_json(info)
        return
    if verbose:
        for s in feats.skipped:
            detail = f" ({s.detail})" if s.detail else ""
            err_console.print(f"skipped {s.path}: {s.reason}{detail}", highlight=False)
    if summary:
        hint = "" if verbose else " (--verbose lists them)"
        err_console.print(f"{summary}{hint}", highlight=False)
    print_class_notes(feats)
    console.print(
        f"wrote {output}: {feats.num_classes} classes, {sum(feats.counts)} images "
        f"({feats.stats.cache_hits} from cache, {feats.stats.decoded} encoded), {feats.encoder}",
        highlight=False,
    )
