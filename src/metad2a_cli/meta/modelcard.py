"""A Hugging Face model card (README.md) for a meta-trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def render(config: dict[str, Any], heldout: list[dict[str, Any]] | None = None) -> str:
    """``heldout``: the per-set reports of benchmarks/heldout_fit.py, when measured."""
    db = config.get("database", {})
    terms = config.get("predictor", {}).get("terms", ["dataset"])
    metrics = config.get("metrics", {})
    best = metrics.get("best_val", {})
    enc = config["encoder"]
    lines = [
        "---",
        "license: mit",
        "library_name: metad2a",
        "tags: [neural-architecture-search, nas-bench-201, meta-learning, metad2a]",
        "pipeline_tag: image-classification",
        "---",
        "",
        f"# {config.get('name', 'metad2a weights')}",
        "",
        "Meta-trained MetaD2A networks (set encoder, cell generator, meta-performance predictor)",
        "for metad2a: given a labeled image folder they generate and rank",
        "NAS-Bench-201 cells without any search training on that folder.",
        "",
        "## Use",
        "",
        "```bash",
        "metad2a search ./my_images --top-k 5            # these weights are the default",
        "metad2a search ./my_images --weights hf://metad2a/metad2a-nb201",
        "```",
        "",
        "## Training data",
        "",
        f"The predictor's score is the sum of its terms: {', '.join(terms)}.",
        "",
    ]
    if "table" in terms:
        lines += [
            f"- table term: NAS-Bench-201's published 200-epoch accuracies of all cells (`{db.get('table')}`;",
            "  Dong & Yang, ICLR 2020; MIT). Cells it lists are scored by their published accuracy; a prior",
            "  regressed on it scores any other. The benchmark's CIFAR-10/100 results were never used.",
        ]
    lines += [
        f"- database `{db.get('name')}`: {db.get('records')} (task, cell, accuracy) records on {db.get('tasks')} of its tasks,",
        "  built by `metad2a db build` from caltech101, flowers102, omniglot, PACS (4 domains) and",
        "  sklearn digits (images at most 64 px); gtsrb and fashion_mnist were never used.",
        f"  Its records train the dataset term (label schedule `{json.dumps(db.get('schedule', {}))}`)."
        if "dataset" in terms else "  Only its tasks' image features were used, to train the generator.",
        f"- image features: {enc['identity']} (resolution {enc['resolution']}, {enc['feature_dim']}-d)",
        "",
        "## Training",
        "",
        f"`metad2a train`: {metrics.get('epochs')} epochs over the image features of {metrics.get('train_tasks')} of the",
        f"database's tasks, {metrics.get('val_tasks')} more held out for validation (a task without records still",
        f"teaches the generator), {metrics.get('train_seconds', 0) / 60:.1f} min on a 2-core CPU.",
        "",
        "## Validation (held-out table cells and database tasks)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in best.items():
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if heldout:
        lines += ["", "## What users get: fits on unseen sets (`metad2a fit`, best validation accuracy %)", "",
                  "| set | recipe | search top-1 | best of top-5 | ResNet cell | largest cell | random panel best / median |",
                  "|---|---|---|---|---|---|---|"]
        for r in heldout:
            picks = [p["best_val_acc"] for p in r["picks"] if p["best_val_acc"] is not None]
            panel = r["random_panel"]

            def f(v):
                return "-" if v is None else f"{v:.2f}"  # 400 validation images: a quarter point is one

            lines.append(
                f"| {r['set']} | {r['recipe']} | {f(picks[0] if picks else None)} | {f(max(picks) if picks else None)} | "
                f"{f(r['resnet'])} | {f(r['largest'])} | {f(panel['best'])} / {f(panel['median'])} (n={panel['n']}) |"
            )
    lines += [
        "",
        "## Limits",
        "",
        "- Predicted accuracies are on the scale of the training labels"
        + (" (ImageNet16-120 test accuracy after 200 epochs)" if "table" in terms else "") + ": use them to rank.",
        "- A table term ranks cells as full training does; short fits on small datasets can",
        "  favour other cells (see the table above): train the top few cells, not only the first.",
        "- Works with the image encoder named above only; metad2a refuses other encoders.",
        "",
        "## Licence",
        "",
        "MIT, as metad2a. The training images keep their own licences (see the database sources).",
        "",
    ]
    return "\n".join(lines)


def write(folder: Path, config: dict[str, Any], heldout: list[dict[str, Any]] | None = None) -> Path:
    from ..atomic import atomic_paths

    path = Path(folder) / "README.md"
    with atomic_paths(path) as (tmp,):
        tmp.write_text(render(config, heldout))
    return path
