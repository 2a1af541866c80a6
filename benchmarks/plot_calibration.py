"""Plot proxy cost against rank correlation from proxy_calibration.py's JSON.

    python benchmarks/plot_calibration.py docs/proxy_calibration.json docs/proxy_calibration.png

Needs matplotlib (a benchmark-only dependency: pip install matplotlib).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in sorted(data["results"].items()):
        s = r["schedule"]
        label = f"{name}: C={s['channels']}, {s['input_size']}px, {s['epochs']} ep, {r['train_images']} img ({r['cells']} cells)"
        ax.scatter(r["seconds_per_cell"], r["spearman"], s=40)
        ax.annotate(label, (r["seconds_per_cell"], r["spearman"]), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"CPU seconds per cell ({data['machine']}, shared)")
    ax.set_ylabel("Spearman vs published NB201 CIFAR-10 accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(r["seconds_per_cell"] for r in data["results"].values()) * 1.9)
    ax.axhline(0.8, ls="--", lw=0.8, color="grey")
    ax.set_title("Proxy schedules: cost vs ranking fidelity")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
