import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metad2a_cli.cli import run
from metad2a_cli.nb201.cells import Cell

RESNET = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"
BIN = Path(sys.executable).parent


def test_help_explains_every_command_without_torch():
    code = (
        "import sys\n"
        "from metad2a_cli.cli import run\n"
        "codes = [run(a) for a in (['--help'], ['cell', '--help'], ['export', '--help'])]\n"
        "print('TORCH', 'torch' in sys.modules, codes)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH False [0, 0, 0]" in out
    assert "Example" in out and "export" in out and "--run" in out and "--rank" in out


def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "metad2a_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("metad2a ")


def test_bad_cell_is_one_line_exit_2():
    exe = BIN / "metad2a"
    bad = "|none~0|+|none~0|max_pool~1|+|none~0|none~1|none~2|"
    out = subprocess.run([str(exe), "cell", bad], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "unknown op 'max_pool'" in out.stderr
    assert "Traceback" not in out.stderr


def test_cell_json(capsys):
    assert run(["cell", "11472", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cell"] == RESNET and info["nb201_index"] == 11472
    # NAS-Bench-201 publishes 0.073306 M parameters and 7.78305 M FLOPs for its smallest
    # CIFAR-10 network (C=16, N=5, 10 classes, 32x32): the command's defaults.
    assert run(["cell", "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", "--json"]) == 0
    smallest = json.loads(capsys.readouterr().out)
    assert smallest["params"] == 73306 and smallest["flops"] == pytest.approx(7.78305e6, abs=10)


@pytest.mark.parametrize("option, value, keyword", [
    ("--num-classes", "100", {"num_classes": 100}),
    ("--channels", "32", {"channels": 32}),
    ("--cells", "2", {"cells_per_stage": 2}),
    ("--in-channels", "1", {"in_channels": 1}),
])
def test_cell_options_change_the_cost(capsys, option, value, keyword):
    from metad2a_cli.nb201.cost import cell_cost

    assert run(["cell", RESNET, "--json", option, value]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = cell_cost(Cell.parse(RESNET), **keyword)
    assert (info["params"], info["flops"]) == (expected.params, expected.flops)
    assert expected.flops != cell_cost(Cell.parse(RESNET)).flops  # the option matters


def test_cell_input_size_scales_the_flops_only(capsys):
    run(["cell", RESNET, "--json"])
    base = json.loads(capsys.readouterr().out)
    run(["cell", RESNET, "--json", "--input-size", "64", "64"])
    big = json.loads(capsys.readouterr().out)
    assert big["params"] == base["params"] and big["flops"] > 3.9 * base["flops"]


def test_export_onnx_from_cli(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    args = ["export", "--arch", RESNET, "-o", str(out), "--json", "--channels", "4", "--cells", "1"]
    assert run(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files"] == [str(out)] and out.stat().st_size > 0
    assert info["nb201_index"] == 11472 and info["max_abs_diff"] <= 1e-4


def test_export_refuses_an_existing_output_without_force(tmp_path, capsys):
    # -f torch -o DIR/model.pt2 also writes DIR/model.safetensors and DIR/model.json.
    weights = tmp_path / "model.safetensors"
    weights.write_text("a checkpoint's weights")
    args = ["export", "--arch", "1", "-f", "torch", "-o", str(tmp_path / "model.pt2"), "--channels", "4", "--cells", "1"]
    assert run(args) == 2
    assert f"error: {weights} exists; add --force to replace it" in capsys.readouterr().err
    assert weights.read_text() == "a checkpoint's weights" and not (tmp_path / "model.pt2").exists()
    assert run([*args, "--force"]) == 0
    assert "wrote" in capsys.readouterr().out and weights.stat().st_size > 100


def test_export_format_follows_the_extension_unless_given(tmp_path, capsys):
    small = ["--arch", "1", "--channels", "2", "--cells", "1", "--json"]
    assert run(["export", *small, "-o", str(tmp_path / "a.pt2")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "torch"
    assert run(["export", *small, "-f", "ONNX", "-o", str(tmp_path / "b.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "onnx"
    assert run(["export", *small, "-o", str(tmp_path / "c.model")]) == 0  # no known extension: onnx
    assert json.loads(capsys.readouterr().out)["format"] == "onnx"


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "{tmp}/missing", "--arch", "1", "-o", "{tmp}/run"],
        ["encode", "{tmp}/missing", "-o", "{tmp}/f.safetensors"],
        ["db", "build", "{tmp}/db", "-s", "{tmp}/missing", "--tasks", "1"],
        ["train", "--out", "{tmp}/busy"],
    ],
)
def test_a_failed_start_prints_one_line_and_leaves_nothing(args, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    assert run([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # no empty progress display before it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def _save_run(cache: Path, run_id: str, cells: list[str], num_classes: int) -> None:
    runs = cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    doc = {
        "id": run_id,
        "dataset": {"num_classes": num_classes},
        "ranking": [{"rank": i + 1, "cell": c} for i, c in enumerate(cells)],
    }
    (runs / f"{run_id}.json").write_text(json.dumps(doc))
    (runs / "last").write_text(run_id)


def test_export_from_saved_run(tmp_path, capsys):
    cache = Path(os.environ["METAD2A_CACHE"])
    second = str(Cell.from_index(42))
    _save_run(cache, "run-1", [RESNET, second], num_classes=7)
    out = tmp_path / "m.pt2"
    assert run(["export", "--run", "last", "--rank", "2", "-f", "torch", "-o", str(out), "--json",
                "--channels", "4", "--cells", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cell"] == second
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["num_classes"] == 7

    assert run(["export", "--run", "run-1", "--rank", "3", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "no rank 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["export", "-o", "m.onnx"], "exactly one of --arch, --run or --from-fit"),
        (["export", "--arch", "1", "--run", "last", "-o", "m.onnx"], "exactly one of --arch, --run or --from-fit"),
        (["export", "--run", "last", "-o", "m.onnx"], "no saved search run"),
        (["export", "--arch", "99999", "-o", "m.onnx"], "not in 0..15624"),
        (["export", "--arch", "1", "-o", "/nonexistent-dir/m.onnx"], "does not exist"),
        (["export", "--arch", "1", "--in-channels", "2", "-o", "m.onnx"], "1 or 3"),
        (["export", "--arch", "1", "--input-size", "8", "8", "-o", "m.onnx"], "at least 16x16"),
        (["export", "--arch", "1", "-f", "torch", "-o", "m.onnx"], "m.onnx has the extension of the onnx format, but the format is torch"),
        (["export", "--arch", "1", "-f", "onnx", "-o", "m.pt2"], "m.pt2 has the extension of the torch format"),
        (["export", "--arch", "1", "-f", "tflite", "-o", "m.onnx"], "unknown format 'tflite'"),
        (["export", "--arch", "1", "--rank", "3", "-o", "m.onnx"], "--rank picks a cell of a saved search: use it with --run"),
    ],
)
def test_export_user_errors(args, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(args) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "args, shown",
    [
        (["cell", "[/x]"], "'[/x]'"),
        (["search", "data/[/x]"], "data/[/x] does not exist"),
        (["search", "data/[my data]"], "data/[my data] does not exist"),
        (["export", "--arch", "1", "-o", "[bold]/m.onnx"], "output folder [bold] does not exist"),
    ],
)
def test_user_text_is_printed_as_it_is(args, shown, capsys, tmp_path, monkeypatch):
    # Square brackets are rich markup: unescaped, "[/x]" crashed and "[my data]" vanished.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # search: the packaged weights, at once
    assert run(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and shown in last


def test_json_list_errors_keep_their_brackets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "list.json").write_text('[["a.png"]]')
    assert run(["search", str(tmp_path / "list.json")]) == 2
    assert "expected {'path': ..., 'label': ...} or [path, label]" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["db", "info", "a" * 300], ["search", "a" * 300], ["cell", "1"]])
def test_an_os_error_on_a_path_is_one_line(args, capsys, monkeypatch, tmp_path):
    # Any path check can meet ENAMETOOLONG, EACCES or EIO; none may end in a traceback.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if args[0] == "cell":
        from metad2a_cli.nb201 import cost

        def unreadable(*a, **k):
            raise OSError(5, "Input/output error", "/some/file")

        monkeypatch.setattr(cost, "cell_cost", unreadable)
    assert run(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and ("File name too long" in last or "/some/file: Input/output error" in last)


def test_help_keeps_bracketed_install_extras(capsys):
    # Rich markup would swallow an unescaped "[ray]" and tell users to install the wrong thing.
    assert run(["db", "build", "--help"]) == 0
    assert "metad2a[ray]" in "".join(capsys.readouterr().out.split())


def test_help_prose_is_one_line_a_paragraph_and_examples_keep_theirs():
    from metad2a_cli.cli.common import reflowed

    def command():
        """Does a thing to a folder, in a sentence
        wrapped in the source.

        Examples:
          metad2a thing a
          metad2a thing b
        """

    assert reflowed(command).__doc__ == (
        "Does a thing to a folder, in a sentence wrapped in the source.\n\nExamples:\n  metad2a thing a\n  metad2a thing b"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["cell", "-1"], "error: No such option: -1; see `metad2a cell --help`"),
        (["bogus"], "error: No such command 'bogus'; see `metad2a --help`"),
        (["export", "--arch", "1"], "error: Missing option '-o' / '--output'; see `metad2a export --help`"),
    ],
)
def test_a_command_line_the_parser_refuses_is_one_line_exit_2(args, message, capsys):
    assert run(args) == 2
    assert capsys.readouterr().err == message + "\n"


def test_no_arguments_prints_the_help():
    out = subprocess.run([str(BIN / "metad2a")], capture_output=True, text=True)
    assert out.returncode == 2 and "Usage: metad2a" in out.stdout + out.stderr and "error:" not in out.stderr
