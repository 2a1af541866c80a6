"""Where should `fit --top-k` make its first cut? Successive halving replayed on the
database's learning curves.

Every record of a 30-epoch database keeps its cell's validation accuracy after each epoch
(``curve``). A halving's candidate that stops at a rung has trained the first epochs of the
same schedule, so its standing at a rung is the best accuracy of its curve up to the rung's
epoch, exactly what ``fit --top-k`` compares. Replaying a plan on every group of K cells of a
task (all C(10, K) groups of a complete task; the search's order inside a group is the
published ImageNet16-120 accuracy, the dataset-independent part of the predictor) gives, for
the plan's cost in epochs, how far the kept cell falls short of the best of the K
(``regret``) and how much it gains over training only the first cell.

Two families, one knob each, so that the choice is not fitted to the tasks' noise:
- ``halving``: the cells halve at every rung (5, 3, 2, 1 for K 5) and the rungs lie evenly
  on a log scale from the first cut to E (``halving.log_rungs``; ``fit --top-k`` put the
  first cut at E/8 until this benchmark, and at E/3 since);
- ``one-cut``: all K train to the cut, the best goes on alone to E.

The curves come from the database's recipe (crop-flip augmentation), not fit's default
(none); both train the same network with the same schedule.

    python benchmarks/halving_rungs.py --db databases/nb201_30ep --out docs/halving_rungs.json
    python benchmarks/halving_rungs.py --table docs/halving_rungs.json   # as docs/fit.md's table
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
from collections import defaultdict
from pathlib import Path

from metad2a_cli.meta.table import TABLE_FILE, load_table
from metad2a_cli.nb201.cells import Cell
from metad2a_cli.training.halving import Rung, budget_epochs, distinct_epochs, log_rungs, plan_rungs, stopped_after

REPO = Path(__file__).resolve().parents[1]


def one_cut(epochs: int, k: int, cut: int) -> list[Rung]:
    return [Rung(cut, k), Rung(epochs, 1)]


def replay(plan: list[Rung], curves: list[list[float]]) -> int:
    """The index (in search order) of the cell the plan keeps, cut as `fit --top-k` cuts."""
    return stopped_after(plan, [[max(curve[: r.epoch]) for r in plan] for curve in curves]).index(None)


def load(db: Path) -> dict[str, list[dict]]:
    """Each task's records in the search's order (by published accuracy)."""
    published = load_table(db / TABLE_FILE)
    table = dict(zip(published.codes.tolist(), published.accuracy.tolist()))
    tasks = defaultdict(list)
    for line in (db / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        tasks[r["task"]].append({"final": max(r["curve"]), "curve": r["curve"], "table": table[Cell.parse(r["cell"]).code]})
    return {t: sorted(records, key=lambda r: -r["table"]) for t, records in tasks.items()}


def evaluate(plan, tasks: dict[str, list[dict]], k: int) -> dict:
    """Means over tasks of every group of k cells (each task's groups averaged first, so every
    task weighs the same)."""
    regret, gain, found, leader_regret = [], [], [], []
    for records in tasks.values():
        r_t, g_t, f_t = [], [], []
        for group in itertools.combinations(records, k):  # each in the search's order, as records are
            kept = group[replay(plan, [r["curve"] for r in group])]["final"]
            best = max(r["final"] for r in group)
            r_t.append(best - kept)
            g_t.append(kept - group[0]["final"])
            f_t.append(kept == best)
        regret.append(round(statistics.fmean(r_t), 4))
        gain.append(statistics.fmean(g_t))
        found.append(statistics.fmean(f_t))
        leaders = records[:k]
        kept = leaders[replay(plan, [r["curve"] for r in leaders])]["final"]
        leader_regret.append(max(r["final"] for r in leaders) - kept)
    return {
        "mean_regret": round(statistics.fmean(regret), 2),
        "median_task_regret": round(statistics.median(regret), 2),
        "mean_gain_over_first": round(statistics.fmean(gain), 2),
        "found_best": round(statistics.fmean(found), 3),
        # one group a task: its k cells with the best published accuracy, as a search might pick
        "table_leaders_mean_regret": round(statistics.fmean(leader_regret), 2),
        "task_regret": regret,
    }


def paired(before: list[float], after: list[float], draws: int = 2000) -> dict:
    """Per-task regret, before minus after: how many tasks each plan wins and a bootstrap
    (over tasks) of the mean difference."""
    diff = [b - a for b, a in zip(before, after)]
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(diff, k=len(diff))) for _ in range(draws))
    return {"tasks_after_better": sum(d > 0 for d in diff), "tasks_before_better": sum(d < 0 for d in diff),
            "mean_regret_drop": round(statistics.fmean(diff), 2),
            "mean_regret_drop_90ci": [round(means[int(0.05 * draws)], 2), round(means[int(0.95 * draws)], 2)]}


def table(out: dict, firsts=(2, 4, 6, 8, 10, 12, 15, 20), cuts=(4, 10, 15, 20)) -> str:
    """docs/fit.md's table: a few plans of each family between the two ends."""
    lines = ["| plan | rungs (epoch: cells) | epochs trained | mean regret | median task regret | best of K kept "
             "| gain over the first cell | regret, table leaders |", "|---|---|---|---|---|---|---|---|"]
    ref = out["reference"]
    now, before = ref["fit --top-k"]["first_cut"], ref["fit --top-k before"]["first_cut"]

    def row(name, r):
        rungs = ", ".join(f"{e}: {c}" for e, c in r.get("rungs", [])) or "-"
        lines.append(f"| {name} | {rungs} | {r['epochs_trained']} | {r['mean_regret']:.2f} | {r['median_task_regret']:.2f} "
                     f"| {r['found_best']:.0%} | {r['mean_gain_over_first']:.2f} | {r['table_leaders_mean_regret']:.2f} |")

    row("first cell only", ref["first cell only"])
    for r in out["plans"]:
        if r["family"] == "halving" and r["first_cut"] in firsts:
            tag = " (`fit --top-k` now)" if r["first_cut"] == now else " (before)" if r["first_cut"] == before else ""
            row(f"halving, first cut {r['first_cut']}{tag}", r)
    for r in out["plans"]:
        if r["family"] == "one-cut" and r["first_cut"] in cuts:
            row(f"one cut at {r['first_cut']}", r)
    row(f"all {out['k']} in full", ref[f"all {out['k']} in full"])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=REPO / "databases" / "nb201_30ep")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--min-records", type=int, default=10, help="tasks with fewer records are left out")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table", type=Path, help="print docs/fit.md's table from this benchmark's output and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    tasks = {t: r for t, r in load(args.db).items() if len(r) >= args.min_records}
    epochs = {len(r["curve"]) for rs in tasks.values() for r in rs}
    assert len(epochs) == 1, f"curves of several lengths: {epochs}"
    (E,) = epochs
    rows = []
    for family, make in (("halving", log_rungs), ("one-cut", one_cut)):
        for first in range(1, E):
            plan = make(E, args.k, first)
            if not distinct_epochs(plan):
                continue
            rows.append({"family": family, "first_cut": first, "rungs": [(r.epoch, r.cells) for r in plan],
                         "epochs_trained": budget_epochs(plan),
                         **evaluate(plan, tasks, args.k)})
    reference = {
        "first cell only": {"epochs_trained": E, **evaluate([Rung(E, 1)], tasks, args.k)},
        f"all {args.k} in full": {"epochs_trained": args.k * E, **evaluate([Rung(E, args.k), Rung(E, 1)], tasks, args.k)},
    }
    chosen = [(r.epoch, r.cells) for r in plan_rungs(E, args.k)]
    reference["fit --top-k"] = next(r for r in rows if r["family"] == "halving" and r["rungs"] == chosen)
    before = math.ceil(E / 2 ** (len(chosen) - 1))  # the first cut at E/2^cuts, as fit --top-k had it
    reference["fit --top-k before"] = next(r for r in rows if r["family"] == "halving" and r["first_cut"] == before)
    reference["paired"] = paired(reference["fit --top-k before"]["task_regret"], reference["fit --top-k"]["task_regret"])
    for row in rows + [v for v in reference.values() if "task_regret" in v]:
        row.pop("task_regret", None)
    out = {"db": str(args.db.resolve().relative_to(REPO)), "k": args.k, "epochs": E, "tasks": len(tasks),
           "records": sum(len(r) for r in tasks.values()),
           "groups": sum(math.comb(len(r), args.k) for r in tasks.values()),
           "reference": reference, "plans": rows}
    for row in rows:
        print(f"{row['family']:8s} first {row['first_cut']:2d}  {str(row['rungs']):40s} epochs {row['epochs_trained']:4d}"
              f"  regret {row['mean_regret']:5.2f}  gain {row['mean_gain_over_first']:5.2f}  best {row['found_best']:.2f}"
              f"  leaders' regret {row['table_leaders_mean_regret']:5.2f}")
    print(json.dumps(reference, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
