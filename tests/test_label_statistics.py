"""The statistics the label benchmarks report (docs/labels.md quotes them)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from label_reliability import float32_vs_source, precision, sign_test_below  # noqa: E402
from label_retest import difference_follows_table, table_change_by_noise  # noqa: E402


def test_sign_test_counts_the_binomial_tail():
    assert sign_test_below(5, 6) == pytest.approx(7 / 64)
    assert sign_test_below(6, 6) == pytest.approx(1 / 64)
    assert sign_test_below(0, 4) == 1.0
    assert sign_test_below(0, 0) == 1.0


def test_precision_follows_the_device_name():
    assert precision("cpu") == "float32"
    assert precision("cpu bfloat16") == "bfloat16"
    assert precision("cpu bfloat16 emulated") == "bfloat16 emulated"
    assert precision("NVIDIA H200") == "bfloat16"


def row(task, source, spearman, precisions, complete=True, label_sd=4.0, table_sd=5.0):
    return {"task": task, "source": source, "table_spearman": spearman, "precisions": precisions,
            "complete": complete, "label_sd": label_sd, "table_sd": table_sd}


def test_float32_tasks_are_set_against_their_sources_bfloat16_median():
    rows = [
        row("a1", "A", 0.5, ["bfloat16"]), row("a2", "A", 0.6, ["bfloat16"]), row("a3", "A", 0.7, ["bfloat16"]),
        row("a4", "A", 0.9, ["bfloat16", "float32"]),  # mixed: not part of the median
        row("a5", "A", 0.1, ["float32"], label_sd=2.0), row("a6", "A", 0.8, ["float32"]),
        row("a7", "A", -0.9, ["float32"], complete=False),  # incomplete: left out
        row("b1", "B", 0.0, ["float32"]),  # no bfloat16 task in its source to compare with
        row("c1", "C", float("nan"), ["bfloat16"]),
    ]
    got = float32_vs_source(rows)
    assert got["float32_tasks"] == 2
    assert got["below_source_median"] == 1
    assert got["sign_test_p_one_sided"] == pytest.approx(0.75)
    assert [(t["task"], t["difference"]) for t in got["tasks"]] == [("a5", -0.5), ("a6", 0.2)]
    assert got["mixed_tasks"] == 1
    assert [t["label_sd_over_source_median"] for t in got["tasks"]] == [0.5, 1.0]
    assert got["label_sd_below_source_median"] == 1


def test_float32_tasks_with_narrow_table_spreads_are_judged_against_what_the_spread_predicts():
    # bfloat16 tasks: Spearman = intercept of the source + 0.05 per point of table spread
    rng = np.random.default_rng(3)
    rows = [row(f"{s}{i}", s, base + 0.05 * sd + rng.normal(0, 0.01), ["bfloat16"], table_sd=sd)
            for s, base in (("A", 0.1), ("B", 0.3)) for i, sd in enumerate(rng.uniform(2, 12, 12))]
    on_the_line = [row(f"f{i}", s, base + 0.05 * sd, ["float32"], table_sd=sd)
                   for i, (s, base, sd) in enumerate([("A", 0.1, 2.0), ("B", 0.3, 3.0), ("A", 0.1, 2.5), ("B", 0.3, 2.0)])]
    got = float32_vs_source(rows + on_the_line)
    # narrow spreads put all four below their source's median, but not below the prediction
    assert got["below_source_median"] == 4
    adjusted = got["spread_adjusted"]
    assert adjusted["float32_tasks"] == 4
    assert adjusted["slope_per_table_sd_point"] == pytest.approx(0.05, abs=0.01)
    assert abs(adjusted["mean_residual"]) < 0.02 and adjusted["draw_share_at_most"] > 0.05

    below_the_line = [dict(r, table_spearman=r["table_spearman"] - 0.3) for r in on_the_line]
    low = float32_vs_source(rows + below_the_line)["spread_adjusted"]
    assert low["below_prediction"] == 4 and low["mean_residual"] == pytest.approx(-0.3, abs=0.02)
    assert low["draw_share_at_most"] < 0.01


def test_a_change_within_label_noise_is_common_and_a_reversal_is_not():
    table = np.arange(10.0)
    same = table_change_by_noise(table.copy(), table.copy(), table)
    assert same["table_spearman"] == [1.0, 1.0]
    assert same["table_spearman_change"] == 0.0 and same["noise_share_at_least_change"] == 1.0

    rng = np.random.default_rng(1)
    a = table * 3
    nudged = table_change_by_noise(a, a + rng.normal(0, 1.0, 10), table)
    assert nudged["noise_share_at_least_change"] > 0.2

    reversed_ = table_change_by_noise(a, a[::-1].copy(), table)
    assert reversed_["table_spearman_change"] == -2.0
    assert reversed_["noise_share_at_least_change"] < 0.05
    assert reversed_["noise_change_sd"] > 0


def test_a_difference_along_the_table_stands_out_of_its_shuffles():
    rng = np.random.default_rng(2)
    tables = [rng.normal(40, 5, 10) for _ in range(4)]
    along = difference_follows_table([(-0.5 * t + rng.normal(0, 0.5, 10), t) for t in tables])
    assert along["tasks"] == 4 and along["mean_spearman"] < -0.8
    assert along["shuffle_share_at_least"] < 0.01

    unrelated = difference_follows_table([(rng.normal(0, 3, 10), t) for t in tables])
    assert abs(unrelated["mean_spearman"]) < abs(along["mean_spearman"])
    assert unrelated["shuffle_share_at_least"] > along["shuffle_share_at_least"]


def test_shares_writing_one_file_keep_each_others_labels(tmp_path):
    from label_budget import locked_update, read_labels

    out = tmp_path / "retest.json"
    summarise = lambda labels: {"count": len(labels), "labels": labels}  # noqa: E731
    locked_update(out, {"cell": "a"}, summarise)  # one share's label
    locked_update(out, {"cell": "b"}, summarise)  # another's, written after it
    assert [r["cell"] for r in read_labels(out)] == ["a", "b"]
    assert locked_update(out, None, summarise)["count"] == 2  # a report adds nothing
