"""How much of a database's labels is signal: per task, the spread of its records' accuracies
against the sampling noise of a validation accuracy, and how well the labels transfer to
what users get (held-out fits), next to the published table.

- Sampling noise: a validation accuracy p measured on n images has standard deviation
  sqrt(p(1-p)/n) from the choice of images alone (the training seed adds more). A task's
  reliability is 1 - noise variance / label variance: near 1 the labels rank cells, near or
  below 0 their order within the task is noise.
- Transfer: a ridge regression on which operation sits on each edge (30 one-hot features),
  fitted to the within-task standardised labels of every task, then its Spearman against the
  held-out fits of `docs/heldout_fits.json` (the fits are only read here, to evaluate);
  the published ImageNet16-120 table's Spearman against the same fits beside it.
- What to expect of a task's agreement with the table: the same Spearman for the held-out
  fits of the panel's 20 random cells, and its median over 10-cell subsets of them (a task
  has 10 cells). A label is a fit, so it can agree with full training no better than `fit`
  itself does in that regime. A task's `table_sd` is the spread of its cells' published
  accuracies: the narrower, the lower a Spearman for the same noise.
- Precision: a record trained under bfloat16 autocast (a GPU, or a CPU that computes it
  natively) or in float32 (any other CPU); its device says which. Each task labelled wholly
  in float32 is set against the median of its source's tasks labelled wholly in bfloat16,
  with a one-sided sign test of "float32 tasks sit lower" (chance alone puts half below),
  and again after what each task's source and table spread predict (`spread_adjusted`).
- The draw's median: builds reach tasks in draw order but not evenly over sources, so the
  plain median over complete tasks leans to whichever sources were built first. Weighting
  each complete task by its source's share of the whole draw (divided among the source's
  complete tasks) estimates what the median will be once every task is built; a bootstrap
  over tasks within each source says how sure that estimate is. Sources with no complete
  task yet are named, since they cannot be weighted.

    python benchmarks/label_reliability.py --db databases/nb201 --out docs/label_reliability.json

Reads only files; seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from metad2a_cli.meta.db import Database
from metad2a_cli.meta.table import TABLE_FILE, load_table
from metad2a_cli.meta.train import spearman
from metad2a_cli.nb201.cells import NUM_CELLS, OPS, Cell

REPO = Path(__file__).resolve().parents[1]
MIN_RECORDS = 5  # a task's spread means little with fewer cells
RIDGE = 10.0


def standardise(values) -> np.ndarray:
    v = np.asarray(values, float)
    return (v - v.mean()) / (v.std() or 1.0)


def sampling_noise(acc: np.ndarray, n_val: int) -> float:
    """Variance of a validation accuracy (a fraction) from the choice of ``n_val`` images alone,
    averaged over the labels ``acc``."""
    return float(np.mean(acc * (1 - acc)) / n_val)


def published_accuracy(table) -> np.ndarray:
    """(15625,) a PublishedTable's accuracy by Cell.code, NaN where it lists none."""
    acc = np.full(NUM_CELLS, np.nan)
    acc[table.codes] = table.accuracy
    return acc


def edge_ops(cell: str) -> np.ndarray:
    """(edges * ops,) one-hot of the operation on each edge."""
    ops = Cell.parse(cell).ops
    x = np.zeros(len(ops) * len(OPS))
    x[np.arange(len(ops)) * len(OPS) + np.asarray(ops)] = 1.0
    return x


def precision(device: str) -> str:
    """The arithmetic a record's device trained in (`device_name` says "cpu" only for float32;
    "cpu bfloat16 emulated" names the labels of `docs/label_emulation_30ep.json`, made while
    fit emulated bfloat16 on CPUs without it, 9438f6b)."""
    if device == "cpu":
        return "float32"
    return "bfloat16 emulated" if device.endswith(" emulated") else "bfloat16"


def sign_test_below(below: int, n: int) -> float:
    """One-sided p of at least ``below`` of ``n`` falling below a median by chance."""
    return sum(math.comb(n, k) for k in range(below, n + 1)) / 2**n if n else 1.0


def float32_vs_source(rows: list[dict]) -> dict:
    """Each complete task labelled wholly in float32 against its source's bfloat16 median."""
    complete = [r for r in rows if r["complete"] and np.isfinite(r["table_spearman"])]
    bf16_rows = [r for r in complete if r["precisions"] == ["bfloat16"]]
    bf16 = defaultdict(list)
    for r in bf16_rows:
        bf16[r["source"]].append(r)
    # per source: the bfloat16 tasks' median agreement and median label spread
    medians = {s: (statistics.median(x["table_spearman"] for x in rs), statistics.median(x["label_sd"] for x in rs))
               for s, rs in bf16.items()}
    f32_rows = [r for r in complete if r["precisions"] == ["float32"] and r["source"] in medians]
    compared = []
    for r in f32_rows:
        spearman_median, sd_median = medians[r["source"]]
        compared.append({"task": r["task"], "source": r["source"], "table_spearman": r["table_spearman"],
                         "source_bfloat16_median": round(spearman_median, 3),
                         "difference": round(r["table_spearman"] - spearman_median, 3),
                         # a narrower spread of labels with the same noise ranks worse
                         "label_sd_over_source_median": round(r["label_sd"] / sd_median, 2)})
    below = sum(c["difference"] < 0 for c in compared)
    narrower = sum(c["label_sd_over_source_median"] < 1 for c in compared)
    return {"float32_tasks": len(compared), "below_source_median": below,
            "sign_test_p_one_sided": round(sign_test_below(below, len(compared)), 3),
            "label_sd_below_source_median": narrower,
            "label_sd_sign_test_p_one_sided": round(sign_test_below(narrower, len(compared)), 3),
            "median_difference": round(statistics.median(c["difference"] for c in compared), 3) if compared else None,
            "mixed_tasks": sum(len(r["precisions"]) > 1 for r in complete),
            "spread_adjusted": spread_adjusted(bf16_rows, f32_rows), "tasks": compared}


def spread_adjusted(bf16: list[dict], f32: list[dict], rounds: int = 20000) -> dict:
    """The float32 tasks' agreement beyond what their source and their cells' table spread
    predict. A task whose ten cells lie close together in the table ranks them worse for the
    same label noise, and which cells a task gets is chance; so the bfloat16 tasks fit
    Spearman ~ source + slope * table_sd, and the float32 tasks' mean residual is set among
    the means of as many residuals drawn from all tasks (one-sided: how often that low).
    ``f32`` holds only tasks of sources that ``bf16`` has."""
    sources = sorted({r["source"] for r in bf16})
    if not f32 or len(bf16) <= len(sources) + 1:
        return {"float32_tasks": len(f32)}

    def design(rs):  # (tasks, sources + 1): source intercepts, then the table spread
        return np.array([[r["source"] == s for s in sources] + [r["table_sd"]] for r in rs], float)

    def spearmans(rs):
        return np.array([r["table_spearman"] for r in rs])

    coef = np.linalg.lstsq(design(bf16), spearmans(bf16), rcond=None)[0]
    resid_f32 = spearmans(f32) - design(f32) @ coef
    pooled = np.concatenate([spearmans(bf16) - design(bf16) @ coef, resid_f32])
    rng = np.random.default_rng(0)
    means = np.array([rng.choice(pooled, len(f32), replace=False).mean() for _ in range(rounds)])
    observed = float(resid_f32.mean())
    below = int((resid_f32 < 0).sum())
    return {"float32_tasks": len(f32), "slope_per_table_sd_point": round(float(coef[-1]), 3),
            "below_prediction": below, "sign_test_p_one_sided": round(sign_test_below(below, len(f32)), 3),
            "mean_residual": round(observed, 3),
            "median_residual": round(float(np.median(resid_f32)), 3),
            "draw_share_at_most": round(float(np.mean(means <= observed)), 4),
            "residuals": {r["task"]: round(float(x), 3) for r, x in zip(f32, resid_f32)}}


def fit_vs_table(fits: list[dict], published: np.ndarray, subsets: int = 2000) -> dict:
    """The table's Spearman against one set's fits of the panel's random cells, whole and
    over random 10-cell subsets (seeded): what a task's agreement can reach."""
    from heldout_fit import panel_cells

    acc = {f["cell"]: f["best_val_acc"] for f in fits}
    cells = [c for w, c in panel_cells() if w.startswith("random") and c in acc]
    if len(cells) < 10:
        return {}
    x = np.array([acc[c] for c in cells])
    y = published[[Cell.parse(c).code for c in cells]]
    rng = np.random.default_rng(0)
    sub = [spearman(y[i], x[i]) for i in (rng.choice(len(cells), 10, replace=False) for _ in range(subsets))]
    return {"random_panel_cells": len(cells), "random_panel_table_spearman": round(spearman(y, x), 3),
            "random_panel_table_spearman_10cell_median": round(float(np.median(sub)), 3),
            "random_panel_table_spearman_10cell_sd": round(float(np.std(sub)), 3),
            "random_panel_table_sd": round(float(np.std(y)), 2)}


def weighted_median(values, weights) -> float:
    order = np.argsort(values)
    v, w = np.asarray(values, float)[order], np.asarray(weights, float)[order]
    cum = np.cumsum(w) / w.sum()
    i = int(np.searchsorted(cum, 0.5 - 1e-9))  # a cumulative sum can land a hair off the half
    # at an exact half the median lies between two values, as statistics.median has it
    return float((v[i] + v[i + 1]) / 2) if np.isclose(cum[i], 0.5) and i + 1 < len(v) else float(v[i])


def draw_weighted(rows: list[dict], drawn: dict[str, int], goal: float = 0.5, rounds: int = 2000) -> dict:
    """The complete tasks' median agreement with each source weighted by its share of the draw.
    A task whose labels are all equal has no Spearman: it is counted, not weighted."""
    by_source = defaultdict(list)
    undefined = 0
    for row in rows:
        if row["complete"] and np.isfinite(row["table_spearman"]):
            by_source[row["source"]].append(row["table_spearman"])
        else:
            undefined += row["complete"]
    seen = sorted(by_source)
    if not seen:
        return {}
    total = sum(drawn[s] for s in seen)

    def median_of(groups):
        values = [v for s in seen for v in groups[s]]
        weights = [drawn[s] / total / len(groups[s]) for s in seen for _ in groups[s]]
        return weighted_median(values, weights)

    out = {"median": round(median_of(by_source), 3)}
    if rounds:
        rng = np.random.default_rng(0)
        boot = [median_of({s: rng.choice(by_source[s], len(by_source[s])) for s in seen}) for _ in range(rounds)]
        out["bootstrap_90"] = [round(float(q), 3) for q in np.quantile(boot, [0.05, 0.95])]
        out[f"share_of_bootstraps_at_least_{goal}"] = round(float(np.mean(np.array(boot) >= goal)), 3)
    return {
        **out,
        "sources_weighted": {s: drawn[s] for s in seen},
        # resampling two tasks barely varies them: the interval is too narrow while these are many
        "sources_with_fewer_than_3_complete_tasks": [s for s in seen if len(by_source[s]) < 3],
        "sources_without_a_complete_task": {s: n for s, n in sorted(drawn.items()) if s not in by_source},
        "complete_tasks_without_a_spearman": undefined,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "databases/nb201")
    ap.add_argument("--table", type=Path, default=REPO / "databases/nb201" / TABLE_FILE, help="the published accuracies")
    ap.add_argument("--fits", type=Path, default=REPO / "docs/heldout_fits.json")
    ap.add_argument("--recipe", default="fit/epochs10/seed0/crop-flip", help="held-out fits of this recipe (their key less the subsample size)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    db_dir = args.db.resolve()
    db = Database(db_dir)
    tasks = {t.id: t for t in db.tasks()}
    by_task = defaultdict(list)
    for r in db.records():
        by_task[r.task].append(r)
    published = published_accuracy(load_table(args.table))

    rows = []
    for tid in sorted(t for t, rs in by_task.items() if len(rs) >= MIN_RECORDS):
        acc = np.array([r.accuracy for r in by_task[tid]]) / 100
        n_val = sum(len(files) for files in tasks[tid].val)
        noise, spread = sampling_noise(acc, n_val), float(acc.var(ddof=1))
        codes = [Cell.parse(r.cell).code for r in by_task[tid]]
        rows.append({
            "task": tid, "source": tasks[tid].source, "classes": len(tasks[tid].classes),
            "train_images": sum(len(f) for f in tasks[tid].train), "val_images": n_val,
            "records": len(acc), "label_sd": round(100 * spread**0.5, 2), "noise_sd": round(100 * noise**0.5, 2),
            "reliability": round(1 - noise / spread, 3) if spread else None,
            "table_spearman": round(spearman(published[codes], acc), 3),
            "complete": len(acc) >= len(tasks[tid].cells),
            "precisions": sorted({precision(r.device) for r in by_task[tid]}),
            "table_sd": round(float(np.std(published[[Cell.parse(c).code for c in tasks[tid].cells]])), 2),
        })
    if not rows:
        raise SystemExit(f"{db_dir}: no task has {MIN_RECORDS} records")

    by_source = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    sources = {
        s: {"tasks": len(rs), "median_reliability": statistics.median(r["reliability"] for r in rs),
            "median_table_spearman": statistics.median(r["table_spearman"] for r in rs)}
        for s, rs in sorted(by_source.items())
    }
    # The same agreement along the schedule (best label up to an epoch), complete tasks only. An
    # early epoch of a long schedule is not a short fit (the rate has not annealed).
    drawn = Counter(t.source for t in tasks.values())
    epochs = min((len(r.curve) for row in rows if row["complete"] for r in by_task[row["task"]]), default=0)
    along = {}
    for e in sorted({*range(5, epochs + 1, 5), epochs} - {0}):
        at_e = [{**row, "table_spearman": spearman(published[[Cell.parse(r.cell).code for r in by_task[row["task"]]]],
                                                   [max(r.curve[:e]) for r in by_task[row["task"]]])}
                for row in rows if row["complete"]]
        along[e] = {"draw_weighted_median": draw_weighted(at_e, drawn, rounds=0).get("median")}
        for s in sorted({row["source"] for row in at_e}):
            along[e][s] = round(statistics.median(row["table_spearman"] for row in at_e if row["source"] == s), 3)

    # Ridge on edge operations, fitted to every task's standardised labels.
    x = np.concatenate([[edge_ops(r.cell) for r in by_task[row["task"]]] for row in rows])
    y = np.concatenate([standardise([r.accuracy for r in by_task[row["task"]]]) for row in rows])
    w = np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1]), x.T @ y)

    transfer = {}
    # the recipe and then only the subsample size: a key with more (another rate) is another recipe
    fits = [f for f in json.loads(args.fits.read_text()) if f["recipe"].rsplit("/", 1)[0] == args.recipe]
    for name in sorted({f["set"] for f in fits}):
        got = [f for f in fits if f["set"] == name]
        acc = [f["best_val_acc"] for f in got]
        transfer[name] = {
            "cells": len(got), "val_images": got[0]["num_val"],
            "fits_sd": round(float(np.std(acc, ddof=1)), 2),
            "noise_sd": round(100 * float(np.mean([a / 100 * (1 - a / 100) for a in acc]) / got[0]["num_val"]) ** 0.5, 2),
            "labels_ridge_spearman": round(spearman([edge_ops(f["cell"]) @ w for f in got], acc), 3),
            "table_spearman": round(spearman([published[Cell.parse(f["cell"]).code] for f in got], acc), 3),
            **fit_vs_table(got, published),
        }

    # float32 labels from a CPU without native bfloat16 rank cells worse (docs/labels.md)
    bf16 = [r for r in rows if r["complete"] and r["precisions"] == ["bfloat16"]]
    report = {
        "database": str(db_dir.relative_to(REPO) if db_dir.is_relative_to(REPO) else db_dir),
        "records": sum(r["records"] for r in rows), "tasks": len(rows),
        "median_reliability": statistics.median(r["reliability"] for r in rows),
        "median_table_spearman": statistics.median(r["table_spearman"] for r in rows),
        "complete_tasks": sum(r["complete"] for r in rows),
        "median_table_spearman_complete": round(statistics.median(r["table_spearman"] for r in rows if r["complete"]), 3)
        if any(r["complete"] for r in rows) else None,
        "median_reliability_complete": round(statistics.median(r["reliability"] for r in rows if r["complete"]), 3)
        if any(r["complete"] for r in rows) else None,
        "draw_weighted_table_spearman": draw_weighted(rows, drawn),
        "bfloat16_tasks_only": {
            "complete_tasks": len(bf16),
            "median_table_spearman_complete": round(statistics.median(r["table_spearman"] for r in bf16), 3) if bf16 else None,
            "draw_weighted_table_spearman": draw_weighted(bf16, drawn),
        },
        "table_spearman_along_curves": along,
        "float32_vs_source": float32_vs_source(rows),
        "by_source": sources, "heldout_transfer": transfer, "tasks_detail": rows,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "tasks_detail"}, indent=1))


if __name__ == "__main__":
    main()
