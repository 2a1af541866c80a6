from __future__ import annotations

from pathlib import Path

import typer

from .common import INTERRUPTED, console, err_console, lazy_progress, print_json


def train(
    db: str = typer.Option("nb201", "--db", help=(
        "Database folder, or the name of one in a clone's databases/: "
        "nb201 (10-epoch labels), nb201_30ep (30-epoch, being built)."
    )),
    out: Path = typer.Option(Path("metad2a-weights"), "--out", "-o", help="Checkpoint folder to write."),
    epochs: int = typer.Option(60, "--epochs", help="Passes over the training tasks."),
    tasks_per_step: int = typer.Option(8, "--tasks-per-step", help="Tasks per optimisation step."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate for both networks."),
    seed: int = typer.Option(0, "--seed", help="Seeds the split, the initialisation and the episodes."),
    predictor: str = typer.Option(
        "table", "--predictor",
        help="What the predictor learns: table (published full-training accuracies only; the "
        "shipped weights), database (the database's records only) or both.",
    ),
    table: Path = typer.Option(
        None, "--table", help="CSV of published accuracies (nb201_index, arch_str, accuracy); "
        "default: imagenet16_120.csv in the database folder.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as JSON."),
) -> None:
    """Meta-train the cell generator and the meta-predictor on a database and a table of
    published accuracies.

    Holds out tasks for validation, keeps each network's best epoch, writes a checkpoint
    folder every epoch (use it with `metad2a search --weights DIR`) and can --resume. Runs on
    the CPU: the networks are small.

    Example: metad2a train --db nb201 --out my-weights --epochs 40
    """
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    from ..meta.train import TrainSettings, meta_train, resolve_database, saved_epoch

    settings = TrainSettings(epochs=epochs, tasks_per_step=tasks_per_step, lr=lr, seed=seed, predictor=predictor)
    settings.validate()  # before the progress bar is drawn
    db_path = resolve_database(db)
    try:
        with lazy_progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                           TimeRemainingColumn(), console=err_console) as bar:
            job: list[int] = []  # the bar appears with the first step: a failed start prints its error alone

            def on_step(step: int, steps: int, losses: dict) -> None:
                if not job:
                    job.append(bar.add_task("train", total=None, epoch=0, info=""))
                bar.update(job[0], completed=step, total=steps,
                           info=f"table {losses['table_loss']:.3f} · records {losses['pred_loss']:.3f} · "
                           f"recon {losses['recon']:.3f} · kl {losses['kl']:.2f}")

            def on_epoch(epoch: int, m: dict) -> None:
                if job:
                    bar.update(job[0], epoch=epoch + 1)
                err_console.print(
                    f"epoch {epoch}: val spearman table {m['spearman_table']:.3f} within {m['spearman_within_task']:.3f}"
                    f" pooled {m['spearman_pooled']:.3f}"
                    f" · gen recon {m['gen_recon']:.3f} hit {m['gen_best_cell_hit_rate']:.2f} top-5 {m['gen_top5_coverage']:.2f}"
                    f" unique {m['gen_uniqueness']:.2f} · {m['seconds']:.1f}s",
                    highlight=False,
                )

            ckpt, trainer = meta_train(db_path, out, settings, resume=resume, on_step=on_step, on_epoch=on_epoch,
                                       table_path=table)
    except KeyboardInterrupt:
        _resume_hint(db, out, table, settings, saved_epoch(out))
        raise typer.Exit(INTERRUPTED) from None
    metrics = ckpt.config["metrics"]
    if as_json:
        print_json({"checkpoint": str(out), **metrics})
        return
    console.print(f"wrote {out} ({metrics['epochs']} epochs, {metrics['train_seconds'] / 60:.1f} min)", highlight=False)
    for k, v in metrics["best_val"].items():
        console.print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}", highlight=False)


def _resume_hint(db: str, out: Path, table: Path | None, settings, saved: int | None) -> None:
    from ..meta.train import TrainSettings

    if saved is None:
        err_console.print("interrupted before the first epoch was saved; start again with the same command",
                          highlight=False)
        return
    # A resumed run must keep its settings: name those that are not the defaults.
    default = TrainSettings()
    named = [(flag, getattr(settings, name)) for flag, name in (("--epochs", "epochs"), ("--tasks-per-step", "tasks_per_step"),
             ("--lr", "lr"), ("--seed", "seed"), ("--predictor", "predictor")) if getattr(settings, name) != getattr(default, name)]
    named += [("--table", table)] if table is not None else []
    options = "".join(f" {flag} {value:g}" if isinstance(value, float) else f" {flag} {value}" for flag, value in named)
    err_console.print(f"interrupted in epoch {saved + 1}; go on with: metad2a train --db {db} --out {out}{options} --resume",
                      highlight=False)
