"""How the commands behave around the work: closed pipes, full disks, help texts, labels.

Renders are tiny (a few steps at 32 px) and the networks small: the point is what the
commands do when a reader goes away or a write fails, not the pictures.
"""
from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from featureshift import open_network, save_snapshot
from featureshift.cli import main
from featureshift.grid import NO_RESPONSE_FILL
from featureshift.models.info import ModelInfo, attach_info

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FEATURESHIFT = Path(sys.executable).parent / "featureshift"  # the script pip installed, as a user runs it
TINY = ["--steps", "2", "--size", "32", "--batch-size", "16", "--quiet"]
SQUEEZE_LAYERS = ["features.3", "features.6"]
_real_replace = os.replace


def full_disk_on_call(monkeypatch, n: int, under: Path):
    """From the Nth rename of a finished file under UNDER on, fail as a full disk does."""
    real = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).is_relative_to(under):
            calls.append(dst)
            if len(calls) >= n:
                raise OSError(errno.ENOSPC, "No space left on device", os.fspath(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def assert_one_paragraph(result, *expected):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    text = result.stderr
    assert text.startswith("featureshift: error: ") and text.count("\n") == 1, text
    for part in expected:
        assert part in text, (part, text)


def assert_nothing_half_written(folder: Path):
    """No temporary file left behind, and every image under a final name decodes whole."""
    for path in folder.rglob("*"):
        assert not path.name.startswith("."), f"left behind: {path}"
        if path.suffix in (".png", ".gif"):
            with Image.open(path) as im:
                im.load()


def counting_renders(monkeypatch):
    import featureshift.optvis.engine as engine

    targets = []
    real = engine.render

    def render(model, wanted, *args, **kwargs):
        targets.extend(wanted)
        return real(model, wanted, *args, **kwargs)

    monkeypatch.setattr(engine, "render", render)
    return targets


# ---------------------------------------------------------------- closed pipes

@pytest.mark.parametrize("args, reader", [
    pytest.param("layers squeezenet1_1", "head -1", marks=pytest.mark.slow),
    pytest.param("layers squeezenet1_1", "true", marks=pytest.mark.slow),
    ("--help", "true"),
    ("vis --help", "true"),
])
def test_a_closed_pipe_ends_quietly_as_coreutils_do(args, reader):
    # `true` exits before featureshift has written anything, so its every write meets a closed pipe;
    # `head -1` may leave after the whole listing already sits in the pipe (then 0 is right).
    cmd = f"{shlex.quote(str(FEATURESHIFT))} {args} | {reader}"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert r.stderr == ""
    # --help is written at once: it may sit in the pipe before `true` has gone.
    assert r.returncode in ((141,) if reader == "true" and "--help" not in args else (0, 141)), r


# ---------------------------------------------------------------- full disks

def test_vis_on_a_full_disk_saves_what_it_can_and_a_rerun_renders_the_rest(tmp_path, monkeypatch):
    out = tmp_path / "out" / "grid.png"
    args = ["vis", "squeezenet1_1", *SQUEEZE_LAYERS, "--channels", "0-1", "-o", str(out), *TINY]
    calls = full_disk_on_call(monkeypatch, 3, tmp_path)  # from the third tile of four on, the disk is full
    r = CliRunner().invoke(main, args)
    assert_one_paragraph(r, "No space left on device", "_tiles/features.", "2 of 4 tiles are saved",
                         "the grid", "was not written", "run the same command again")
    # The tiles of a job are written side by side (jobs.executors.run_jobs), so which two reach the
    # disk first varies; the fourth may be tried before the third has failed, and fails as well.
    assert len(calls) in (3, 4) and not out.exists()
    saved = sorted(p.name for p in (tmp_path / "out" / "grid_tiles").iterdir())
    assert len(saved) == 2 and set(saved) < {f"{layer}_{c}.png" for layer in SQUEEZE_LAYERS for c in (0, 1)}
    assert_nothing_half_written(tmp_path)

    monkeypatch.setattr(os, "replace", _real_replace)  # the disk is freed
    rendered = counting_renders(monkeypatch)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    # only what the full disk stopped
    assert sorted(rendered) == sorted((layer, c) for layer in SQUEEZE_LAYERS for c in (0, 1)
                                      if f"{layer}_{c}.png" not in saved)
    assert out.is_file() and "2 channels from earlier tiles" in r.stdout
    assert_nothing_half_written(tmp_path)


def test_merge_on_a_full_disk_leaves_no_output_and_the_inputs_alone(tmp_path, monkeypatch):
    rows = tmp_path / "rows"
    rows.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 10), (80 * i, 0, 0)).save(rows / f"{i}.png")
    before = {p.name: p.read_bytes() for p in rows.iterdir()}
    out = tmp_path / "merged.png"
    full_disk_on_call(monkeypatch, 1, tmp_path)
    r = CliRunner().invoke(main, ["merge", str(rows), "-o", str(out)])
    assert_one_paragraph(r, f"Could not write {out}: No space left on device", "3 input image(s) were only read",
                         "run the same command again")
    assert not out.exists() and {p.name: p.read_bytes() for p in rows.iterdir()} == before
    assert_nothing_half_written(tmp_path)


def test_merge_keeps_an_earlier_output_whole_when_the_new_one_cannot_be_written(tmp_path, monkeypatch):
    rows = tmp_path / "rows"
    rows.mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(rows / "a.png")
    out = tmp_path / "merged.png"
    assert CliRunner().invoke(main, ["merge", str(rows), "-o", str(out)]).exit_code == 0
    first = out.read_bytes()
    Image.new("RGB", (20, 10), (0, 255, 0)).save(rows / "b.png")
    full_disk_on_call(monkeypatch, 1, tmp_path)
    r = CliRunner().invoke(main, ["merge", str(rows), "-o", str(out)])
    assert_one_paragraph(r, str(out), "an earlier file of that name is unchanged")
    assert out.read_bytes() == first


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    model = open_network("squeezenet1_1", weights="random", num_classes=3).module
    model.featureshift_info.class_names = ["daisy", "rose", "tulip"]
    folder = tmp_path / "run"
    for epoch in (0, 1):
        with torch.no_grad():
            model.features[0].weight.add_(0.05 * torch.randn_like(model.features[0].weight))
        save_snapshot(model, folder / "snapshots" / f"{epoch:03d}.safetensors", epoch=epoch,
                      metrics={"val_acc": 0.5})
    return folder


def test_timeline_on_a_full_disk_keeps_its_tiles_and_a_rerun_renders_the_rest(run, monkeypatch):
    args = ["timeline", str(run), "--layer", "features.3.squeeze", "--channels", "0-1", *TINY]
    full_disk_on_call(monkeypatch, 3, run)  # the first snapshot's two tiles are written, then the disk is full
    r = CliRunner().invoke(main, args)
    assert_one_paragraph(r, "No space left on device", "2 of 4 tiles are saved in the tile cache",
                         "run the same command again: it renders only the missing tiles")
    assert_nothing_half_written(run)
    assert not (run / "timeline" / "features.3.squeeze" / "merged.png").exists()

    monkeypatch.setattr(os, "replace", _real_replace)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "2 tile(s) rendered, 2 from the cache" in r.stdout
    assert (run / "timeline" / "features.3.squeeze" / "merged.png").is_file()
    assert_nothing_half_written(run)


def test_timeline_outputs_on_a_full_disk_say_the_tiles_are_safe(run, monkeypatch):
    args = ["timeline", str(run), "--layer", "features.3.squeeze", "--channels", "0-1", *TINY]
    full_disk_on_call(monkeypatch, 5, run)  # all four tiles are written, the first row image is not
    r = CliRunner().invoke(main, args)
    assert_one_paragraph(r, "All 4 tiles are saved", "000.png", "renders nothing and writes the rest")
    monkeypatch.setattr(os, "replace", _real_replace)
    r = CliRunner().invoke(main, args)  # the disk is freed
    assert r.exit_code == 0 and "0 tile(s) rendered, 4 from the cache" in r.stdout


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_vis_into_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        r = CliRunner().invoke(main, ["vis", "squeezenet1_1", "features.3", "--channels", "0", "-o",
                                      str(folder / "g.png"), *TINY])
        assert_one_paragraph(r, "Permission denied", str(folder / "g_tiles"))
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------- render settings

@pytest.mark.parametrize("command", [
    "vis squeezenet1_1 features.3 -o {tmp}/grid.png --steps {steps}",
    "timeline {tmp}/run --layer features.3 --steps {steps}",
    "atlas {tmp}/run --layer features.3 --steps {steps}",
    "compare squeezenet1_1 squeezenet1_1 --layer features.3 -o {tmp}/cmp.png --steps {steps}",
    "report {tmp}/run --steps {steps}",
    "train --data {tmp}/data --out {tmp}/trained --visualize features.3 --vis-steps {steps}",
])
@pytest.mark.parametrize("steps", ["0", "-3"])
def test_a_render_of_no_steps_is_a_usage_error_on_every_command(tmp_path, command, steps):
    # It would write the starting noise under the name of a render of the channel.
    r = CliRunner().invoke(main, shlex.split(command.format(tmp=tmp_path, steps=steps)))
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    flag = "--vis-steps" if "--vis-steps" in command else "--steps"
    assert f"Invalid value for '{flag}': {steps} steps would write the starting noise" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing loaded


# ---------------------------------------------------------------- help texts

def examples(help_text: str, name: str) -> list[list[str]]:
    """The example command lines of a help text: `featureshift NAME ...`, continuation lines joined,
    cut at the first pipe or &&."""
    lines, joined = help_text.splitlines(), []
    for i, line in enumerate(lines):
        text = line.strip()
        if not text.startswith(f"featureshift {name}"):
            continue
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        for stop in ("|", "&&", "#"):
            text = text.split(stop)[0]
        joined.append(shlex.split(text))
    return joined


def test_every_command_has_an_example_that_parses_and_a_quiet_option():
    cli = CliRunner()
    for name, command in sorted(main.commands.items()):
        r = cli.invoke(main, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "--quiet" in r.output, f"`featureshift {name}` has no --quiet"
        found = examples(r.output, name)
        assert found, f"`featureshift {name} --help` shows no example"
        for words in found:  # every option an example uses exists and takes the value it is given
            command.make_context(name, words[2:])


# ---------------------------------------------------------------- labels

@pytest.fixture
def recorded_grids(monkeypatch):
    import featureshift.commands.timeline as timeline_module
    import featureshift.grid as grid

    calls = []
    real = grid.make_grid

    def make(rows, *args, **kwargs):
        calls.append(kwargs)
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(grid, "make_grid", make)
    monkeypatch.setattr(timeline_module, "make_grid", make)
    return calls


def test_vis_labels_classes_by_name(tmp_path, recorded_grids):
    r = CliRunner().invoke(main, ["vis", "squeezenet1_1", "logits", "--channels", "130", "--objective", "logit",
                                  "-o", str(tmp_path / "c.png"), *TINY])
    assert r.exit_code == 0, r.output
    assert recorded_grids[-1]["col_labels"] == ["130 flamingo"]


def test_timeline_labels_classes_by_the_snapshots_names(run, recorded_grids):
    r = CliRunner().invoke(main, ["timeline", str(run), "--layer", "logits", "--channels", "1-2", *TINY])
    assert r.exit_code == 0, r.output
    headers = [call["col_labels"] for call in recorded_grids if call.get("col_labels")]
    assert headers and all(h == ["1 rose", "2 tulip"] for h in headers)  # every row and the merged image


# ---------------------------------------------------------------- no response

@pytest.fixture
def dead_channel():
    """A network whose channel 1 is zero for every input (zero weights, negative bias, ReLU)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = -1
    return attach_info(model.eval(), ModelInfo(arch="tiny", num_classes=4, class_names=list("abcd")))


def test_vis_marks_a_channel_that_does_not_respond(tmp_path, dead_channel):
    from featureshift.commands.vis import vis

    out = tmp_path / "g.png"
    result = vis(dead_channel, "1", out, channels="0-2", steps=3, size=32, batch_size=4, device="cpu",
                 quiet=True, labels=False)
    assert result.no_response == [("1", 1)]
    assert result.warnings == ["1 channel 1: no response (the channel is zero for every input)"]
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert (grid[:, 32:64] == NO_RESPONSE_FILL).all(-1).mean() > 0.5  # the middle tile is the marked one
    assert not (grid[:, :32] == NO_RESPONSE_FILL).all(-1).any()
    again = vis(dead_channel, "1", out, channels="0-2", steps=3, size=32, batch_size=4, device="cpu",
                quiet=True, labels=False)
    assert again.reused == 3 and again.no_response == [("1", 1)]


@pytest.fixture
def dead_run(tmp_path):
    """A run of two snapshots in which channel 1 of features.3.squeeze_activation is zero for every input."""
    torch.manual_seed(0)
    model = open_network("squeezenet1_1", weights="random", num_classes=3).module
    folder = tmp_path / "run"
    for epoch in (0, 1):
        with torch.no_grad():
            model.features[0].weight.add_(0.05 * torch.randn_like(model.features[0].weight))
            model.features[3].squeeze.weight[1] = 0
            model.features[3].squeeze.bias[1] = -1
        save_snapshot(model, folder / "snapshots" / f"{epoch:03d}.safetensors", epoch=epoch)
    return folder


DEAD_LAYER = "features.3.squeeze_activation"


def test_timeline_marks_a_channel_that_does_not_respond(dead_run):
    from featureshift.commands.timeline import timeline

    result = timeline(dead_run, DEAD_LAYER, "0-1", steps=2, size=32, batch_size=16, quiet=True, labels=False)
    assert result.no_response == {(DEAD_LAYER, 0, 1), (DEAD_LAYER, 1, 1)}
    assert f"{DEAD_LAYER} channel 1: no response (the channel is zero for every input) at epochs 0, 1" \
        in result.summary()
    merged = np.asarray(Image.open(result.merged[DEAD_LAYER]).convert("RGB"))
    pad, tile = 2, 32
    second = merged[pad:pad + tile, pad + tile + pad:pad + 2 * tile + pad]
    assert (second == NO_RESPONSE_FILL).all(-1).mean() > 0.5
    assert not (merged[pad:pad + tile, pad:pad + tile] == NO_RESPONSE_FILL).all(-1).any()


def test_a_cached_timeline_still_marks_a_channel_that_does_not_respond(dead_run):
    from featureshift.commands.timeline import timeline

    kw = dict(steps=2, size=32, batch_size=16, quiet=True)
    timeline(dead_run, DEAD_LAYER, "0-1", labels=False, **kw)
    again = timeline(dead_run, DEAD_LAYER, "0-1", **kw)  # labels: the images are drawn again, from the cache
    assert again.rendered == 0 and again.no_response == {(DEAD_LAYER, 0, 1), (DEAD_LAYER, 1, 1)}


def test_compare_on_a_full_disk_says_the_sheet_was_not_written(run, tmp_path, monkeypatch):
    a, b = (str(run / "snapshots" / f"{e:03d}.safetensors") for e in (0, 1))
    out = tmp_path / "sheet.png"
    full_disk_on_call(monkeypatch, 4, tmp_path)  # A's, B's and A's second render (the floor) cached, then full
    r = CliRunner().invoke(main, ["compare", a, b, "--layer", "features.3.squeeze", "--channels", "1", "-o", str(out),
                                  *TINY])
    assert_one_paragraph(r, f"Could not write {out}: No space left on device", "the sheet", "was not written")
    assert not out.exists()
    assert_nothing_half_written(tmp_path)


def test_compare_on_a_disk_full_before_its_renders_are_cached_says_so(run, tmp_path, monkeypatch):
    a, b = (str(run / "snapshots" / f"{e:03d}.safetensors") for e in (0, 1))
    out = tmp_path / "sheet.png"
    full_disk_on_call(monkeypatch, 1, tmp_path)
    r = CliRunner().invoke(main, ["compare", a, b, "--layer", "features.3.squeeze", "--channels", "1", "-o", str(out),
                                  *TINY])
    assert_one_paragraph(r, "No space left on device", f"a tile could not be saved in {tmp_path / 'sheet_cache'}",
                         "no sheet was written", "run the same command again: it renders only the missing tiles")
    assert not out.exists()
    assert_nothing_half_written(tmp_path)
