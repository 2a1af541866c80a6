"""A Hugging Face model card (README.md) for a meta-trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def render(config: dict[str, Any], generalization: dict[str, Any] | None = None) -> str:
    db = config.get("database", {})
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
        f"- database `{db.get('name')}`: {db.get('tasks')} tasks, {db.get('records')} (task, cell, accuracy) records,",
        "  built by `metad2a db build` from caltech101, flowers102, omniglot, PACS (4 domains) and",
        "  sklearn digits (images at most 64 px). gtsrb and fashion_mnist were never used.",
        f"- accuracies come from a cheap proxy schedule: `{json.dumps(db.get('schedule', {}))}`",
        f"- image features: {enc['identity']} (resolution {enc['resolution']}, {enc['feature_dim']}-d)",
        "",
        "## Training",
        "",
        f"`metad2a train`: {metrics.get('epochs')} epochs, {metrics.get('train_tasks')} training tasks,",
        f"{metrics.get('val_tasks')} held-out validation tasks, {metrics.get('train_seconds', 0) / 60:.1f} min on a 2-core CPU.",
        "",
        "## Validation (held-out tasks of the database)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in best.items():
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if generalization:
        lines += ["", "## Unseen datasets (proxy-trained accuracies, %)", "",
                  "| set | predictor Spearman | search top-1 | best of top-5 | ResNet cell | random median | random best (of 30) | NASWOT pick |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in generalization.items():
            lines.append(
                f"| {name} | {r['predictor_spearman']:.3f} | {r['search_top1']:.1f} | {r['search_best_of_top5']:.1f} | "
                f"{r['resnet_cell']:.1f} | {r['random_median']:.1f} | {r['random_best']:.1f} | {r['naswot_pick']:.1f} |"
            )
    lines += [
        "",
        "## Limits",
        "",
        "- Records come from a short proxy training on small images, whose ranking agrees only",
        "  partly with full training (see the project's docs/proxy.md); predicted accuracies are",
        "  proxy accuracies, not what the full network reaches.",
        "- The database is small next to MetaD2A's original (ImageNet-32 subsets); treat the",
        "  ranking as a prior, and train the top few cells.",
        "- Works with the image encoder named above only; metad2a refuses other encoders.",
        "",
        "## Licence",
        "",
        "MIT, as metad2a. The training images keep their own licences (see the database sources).",
        "",
    ]
    return "\n".join(lines)


def write(folder: Path, config: dict[str, Any], generalization: dict[str, Any] | None = None) -> Path:
    from ..atomic import atomic_paths

    path = Path(folder) / "README.md"
    with atomic_paths(path) as (tmp,):
        tmp.write_text(render(config, generalization))
    return path
