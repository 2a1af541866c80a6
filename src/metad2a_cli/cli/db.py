from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from ..errors import UserError
from ..training.schedule import LabelSchedule
from .common import console, err_console, lazy_progress, print_json, reflowed

app = typer.Typer(
    help="Build and inspect meta-training databases of (task, cell, accuracy) records.",
    no_args_is_help=True,
)


def ray_address_optional(argv: list[str]) -> list[str]:
    """``--ray`` with no address (last, or before another option) means ``--ray local``:
    typer has no option whose value may be left out."""
    for k, arg in enumerate(argv):
        if arg == "--ray" and (k + 1 == len(argv) or argv[k + 1].startswith("-")):
            return [*argv[: k + 1], "local", *argv[k + 1 :]]
    return argv


@app.command("build")
@reflowed
def build(
    db: Path = typer.Argument(..., help="Database folder (created, or resumed if it exists)."),
    source: list[Path] = typer.Option(..., "--source", "-s", help="An image collection ROOT/<class>/<images>; repeat for several."),
    tasks: int = typer.Option(300, "--tasks", help="Tasks to draw."),
    cells_per_task: int = typer.Option(10, "--cells-per-task", help="Cells trained per task."),
    min_classes: int = typer.Option(5, "--min-classes", help="Fewest classes in a task."),
    max_classes: int = typer.Option(20, "--max-classes", help="Most classes in a task."),
    images_per_class: int = typer.Option(100, "--images-per-class", help="Train + validation images per class."),
    min_task_images: int = typer.Option(
        0, "--min-task-images", help="Add classes to a task until it holds this many images (or its source runs out)."
    ),
    features_per_class: int = typer.Option(30, "--features-per-class", help="Encoder features stored per class."),
    epochs: int = typer.Option(LabelSchedule.epochs, "--epochs", help="Epochs of each cell's fit (the label's budget)."),
    augment: str = typer.Option(
        LabelSchedule.augment, "--augment", help="Augmentation of each cell's fit (see `metad2a fit --help`)."
    ),
    lr: float = typer.Option(LabelSchedule.lr, "--lr", help="Peak learning rate of each cell's fit."),
    seed: int = typer.Option(0, "--seed", help="Seeds the tasks, the cells and the training."),
    shard: str = typer.Option("0/1", "--shard", help="i/n: this builder trains every n-th task from the i-th."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    chunk: int = typer.Option(0, "--chunk", help="Cells trained together (0: 1 on CPU, 32 on GPU)."),
    ray: str | None = typer.Option(
        None, "--ray", metavar="[ADDRESS]",
        help="Label on Ray: alone (or 'local') on a Ray instance started on this machine; auto, "
        "host:6379 or ray://host:10001 on a running cluster. Needs pip install 'metad2a\\[ray]'.",
    ),
    ray_gpus_per_worker: float | None = typer.Option(
        None, "--ray-gpus-per-worker",
        help="Share of a GPU each Ray worker takes (0.25: four on a GPU; 0: CPUs only). Default: 1 where the cluster has GPUs.",
    ),
) -> None:
    """Draw tasks from image collections and fit NB201 cells on them: each record is the
    validation accuracy `metad2a fit --epochs EPOCHS` would report for the cell on the task.

    Safe to interrupt: run the same command again to resume. Builders on different
    --shard values can share a folder; `metad2a db merge` joins their records. With --ray
    the tasks are labeled on a Ray cluster and this process writes the records; --device is
    then where the features are encoded (docs/distributed.md).

    Example: metad2a db build ./mydb -s ./data/caltech101 -s ./data/omniglot --tasks 50

    Example: metad2a db build ./mydb -s /shared/caltech101 --tasks 3000 --ray auto  # a running cluster
    """
    from ..data.encoder import resolve_device
    from ..meta.db import BuildSettings, Database, default_chunk, parse_shard
    from ..meta.db import build as build_db
    from ..training.policies import check_policy

    check_policy(augment)
    Database(db).check_buildable()  # before the sources are read and hashed
    settings = BuildSettings(
        num_tasks=tasks,
        min_classes=min_classes,
        max_classes=max_classes,
        images_per_class=images_per_class,
        min_task_images=min_task_images,
        features_per_class=features_per_class,
        cells_per_task=cells_per_task,
        seed=seed,
        schedule=LabelSchedule(epochs=epochs, augment=augment, lr=lr),
    )
    settings.validate()  # before the progress bar is drawn
    if chunk < 0:
        raise UserError(f"--chunk must be 0 (automatic) or more, got {chunk}")
    runner = None
    if ray is not None:
        from ..meta.distributed import ray_runner

        runner = ray_runner(ray, ray_gpus_per_worker, chunk)
    elif ray_gpus_per_worker is not None:
        raise UserError("--ray-gpus-per-worker needs --ray")
    dev = resolve_device(device)
    chunk = chunk or default_chunk(str(dev))
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    with lazy_progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),  # a source name is text
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err_console,
    ) as bar:
        stages: dict[str, int] = {}
        job: list[int] = []  # the labels' bar, from the first report

        def features(stage: str, done: int, total: int) -> None:
            if stage not in stages:
                stages[stage] = bar.add_task(stage, total=total, rate="")
            bar.update(stages[stage], completed=done, total=total)

        def report(done: int, todo: int, seconds: float) -> None:
            # One bar for the labels wherever they train: on Ray it counts the whole cluster's.
            if not job:
                job.append(bar.add_task("training cells" + (" on Ray" if runner else ""), total=None, rate=""))
            bar.update(job[0], completed=done, total=todo, rate=f"{60 * done / max(seconds, 1e-9):.1f} records/min")

        try:
            written = build_db(db, source, settings, parse_shard(shard), device=str(dev), chunk=chunk,
                               progress=report, feature_progress=features, runner=runner)
        except KeyboardInterrupt:
            bar.stop()
            err_console.print("stopped: the records written so far are kept; run the same command to resume")
            raise typer.Exit(130) from None
    console.print(f"{written} new records in {db}")


@app.command("info")
@reflowed
def info(
    db: str = typer.Argument(..., help=(
        "Database folder, or the name of one in a clone's databases/: "
        "nb201 (10-epoch labels), nb201_30ep (30-epoch, being built)."
    )),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Tasks, records, sources and the accuracy distribution of a database.

    Example: metad2a db info nb201 --json
    """
    from ..meta.db import Database
    from ..meta.train import resolve_database

    data = Database(resolve_database(db)).info()
    if as_json:
        print_json(data)
        return
    acc = data["accuracy"]
    console.print(f"database   {data['path']}", highlight=False)
    console.print(f"encoder    {data['encoder']}", highlight=False)
    console.print(f"tasks      {data['tasks']} drawn, {data['tasks_complete']} complete")
    d, n = data["draw"], data["train_images_per_task"]
    with contextlib.suppress(KeyError):  # a hand-made manifest may not say how its tasks were drawn
        console.print(f"draw       seed {d['seed']}, {d['min_classes']}-{d['max_classes']} classes, at most "
                      f"{d['images_per_class']} images a class, at least {d['min_task_images']} a task, "
                      f"{d['cells_per_task']} cells a task", highlight=False)
    console.print(f"task size  {n['min']}-{n['max']} training images (median {n['median']:g})", highlight=False)
    console.print(f"records    {data['records']} ({data['unique_cells']} distinct cells)")
    console.print("sources    " + ", ".join(f"{k}: {v}" for k, v in sorted(data["tasks_per_source"].items())))
    console.print("devices    " + ", ".join(f"{k}: {v}" for k, v in sorted(data["records_per_device"].items())), highlight=False)
    s = data["schedule"]
    console.print(f"labels     {s['epochs']}-epoch fits, C={s['channels']} N={s['cells_per_stage']} "
                  f"{s['input_size']} px, augment {s['augment']}, peak lr {s['lr']:g}", highlight=False)
    if acc["min"] is not None:
        console.print(f"accuracy   min {acc['min']:.1f}  median {acc['median']:.1f}  max {acc['max']:.1f}  (%)")
    console.print(f"build time {data['build_seconds'] / 60:.1f} min of training; {data['size_bytes'] / 1e6:.1f} MB on disk")


@app.command("merge")
@reflowed
def merge(db: Path = typer.Argument(..., help="Database folder whose shard files to join.")) -> None:
    """Join the record files of all shards into one (run when every builder is done).

    Example: metad2a db merge ./mydb
    """
    from ..meta.db import Database

    n = Database(db).merge()
    console.print(f"{n} records in {db / 'records.jsonl'}")
