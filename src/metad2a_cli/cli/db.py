from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from ..training.schedule import LabelSchedule
from .common import console, err_console, print_json

app = typer.Typer(
    help="Build and inspect meta-training databases of (task, cell, accuracy) records.",
    no_args_is_help=True,
)


@app.command("build")
def build(
    db: Path = typer.Argument(..., help="Database folder (created, or resumed if it exists)."),
    source: list[Path] = typer.Option(..., "--source", "-s", help="An image collection ROOT/<class>/<images>; repeat for several."),
    tasks: int = typer.Option(300, "--tasks", help="Tasks to draw."),
    cells_per_task: int = typer.Option(10, "--cells-per-task", help="Cells trained per task."),
    min_classes: int = typer.Option(5, "--min-classes", help="Fewest classes in a task."),
    max_classes: int = typer.Option(20, "--max-classes", help="Most classes in a task."),
    images_per_class: int = typer.Option(100, "--images-per-class", help="Train + validation images per class."),
    features_per_class: int = typer.Option(30, "--features-per-class", help="Encoder features stored per class."),
    epochs: int = typer.Option(LabelSchedule.epochs, "--epochs", help="Epochs of each cell's fit (the label's budget)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the tasks, the cells and the training."),
    shard: str = typer.Option("0/1", "--shard", help="i/n: this builder trains every n-th task from the i-th."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    chunk: int = typer.Option(0, "--chunk", help="Cells trained together (0: 1 on CPU, 32 on GPU)."),
) -> None:
    """Draw tasks from image collections and fit NB201 cells on them: each record is the
    validation accuracy `metad2a fit --epochs EPOCHS` would report for the cell on the task.

    Safe to interrupt: run the same command again to resume. Builders on different
    --shard values can share a folder; `metad2a db merge` joins their records.

    Example: metad2a db build ./mydb -s ./data/caltech101 -s ./data/omniglot --tasks 50
    """
    from ..data.encoder import resolve_device
    from ..meta.db import BuildSettings, Database, parse_shard
    from ..meta.db import build as build_db

    Database(db).check_buildable()  # before the sources are read and hashed

    settings = BuildSettings(
        num_tasks=tasks,
        min_classes=min_classes,
        max_classes=max_classes,
        images_per_class=images_per_class,
        features_per_class=features_per_class,
        cells_per_task=cells_per_task,
        seed=seed,
        schedule=LabelSchedule(epochs=epochs),
    )
    settings.validate()  # before the progress bar is drawn
    if chunk < 0:
        raise UserError(f"--chunk must be 0 (automatic) or more, got {chunk}")
    dev = resolve_device(device)
    chunk = chunk or (32 if dev.type == "cuda" else 1)
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("training cells"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err_console,
    ) as bar:
        job = bar.add_task("build", total=None, rate="")
        stages: dict[str, int] = {}

        def features(stage: str, done: int, total: int) -> None:
            if stage not in stages:
                # Progress columns read markup; a source's folder name is the user's text.
                stages[stage] = bar.add_task(stage, total=total, rate=escape(stage))
            bar.update(stages[stage], completed=done, total=total)

        def report(done: int, todo: int, seconds: float) -> None:
            bar.update(job, completed=done, total=todo, rate=f"{60 * done / max(seconds, 1e-9):.1f} records/min")

        written = build_db(db, source, settings, parse_shard(shard), device=str(dev), chunk=chunk,
                           progress=report, feature_progress=features)
    console.print(f"{written} new records in {db}")


@app.command("info")
def info(
    db: Path = typer.Argument(..., help="Database folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Tasks, records, sources and the accuracy distribution of a database.

    Example: metad2a db info ./mydb --json
    """
    from ..meta.db import Database

    data = Database(db).info()
    if as_json:
        print_json(data)
        return
    acc = data["accuracy"]
    console.print(f"database   {data['path']}", highlight=False)
    console.print(f"encoder    {data['encoder']}", highlight=False)
    console.print(f"tasks      {data['tasks']} drawn, {data['tasks_complete']} complete")
    console.print(f"records    {data['records']} ({data['unique_cells']} distinct cells)")
    console.print("sources    " + ", ".join(f"{k}: {v}" for k, v in sorted(data["tasks_per_source"].items())))
    if acc["min"] is not None:
        console.print(f"accuracy   min {acc['min']:.1f}  median {acc['median']:.1f}  max {acc['max']:.1f}  (%)")
    console.print(f"build time {data['build_seconds'] / 60:.1f} min of training; {data['size_bytes'] / 1e6:.1f} MB on disk")


@app.command("merge")
def merge(db: Path = typer.Argument(..., help="Database folder whose shard files to join.")) -> None:
    """Join the record files of all shards into one (run when every builder is done).

    Example: metad2a db merge ./mydb
    """
    from ..meta.db import Database

    n = Database(db).merge()
    console.print(f"{n} records in {db / 'records.jsonl'}")
