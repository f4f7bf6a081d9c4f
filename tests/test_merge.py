import os

import pytest
from click.testing import CliRunner
from PIL import Image

from featureshift import FeatureshiftError
from featureshift.cli import main
from featureshift.commands.merge import merge, natural_key

COLORS = {"row1.png": (255, 0, 0), "row2.png": (0, 255, 0), "row10.png": (0, 0, 255)}


@pytest.fixture
def rows(tmp_path):
    folder = tmp_path / "rows"
    folder.mkdir()
    for i, (name, color) in enumerate(COLORS.items()):
        Image.new("RGB", (20 + 10 * i, 12), color).save(folder / name)  # widths differ on purpose
    return folder


def fingerprint(folder):
    return {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in sorted(folder.iterdir())}


def row_colors(path, n, height=12, pad=2):
    img = Image.open(path).convert("RGB")
    return [img.getpixel((img.width // 2, pad + i * (height + pad) + height // 2)) for i in range(n)]


def test_natural_order_padding_and_inputs_untouched(rows):
    before = fingerprint(rows)
    out = rows / "merged.png"  # written into the input folder, the case the old tool got wrong
    res = merge([rows], out)
    assert [p.name for p in res.inputs] == ["row1.png", "row2.png", "row10.png"]
    assert row_colors(out, 3) == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert Image.open(out).size == (2 + 40 + 2, 2 + 3 * 14)  # padded to the widest
    after = fingerprint(rows)
    assert {k: v for k, v in after.items() if k != "merged.png"} == before

    first = out.read_bytes()
    again = merge([rows], out)  # its own output sits in the folder now
    assert [p.name for p in again.inputs] == ["row1.png", "row2.png", "row10.png"]
    assert ("merged.png" in {p.name for p, _ in again.skipped}) and out.read_bytes() == first


def test_earlier_featureshift_stacks_are_never_inputs(rows, tmp_path):
    merge([rows], rows / "old-merge.png")  # an earlier output under another name
    res = merge(sorted(rows.glob("*.png")), tmp_path / "new.png")  # as a shell glob would pass it
    assert "old-merge.png" not in {p.name for p in res.inputs}
    assert any(p.name == "old-merge.png" for p, _ in res.skipped)


def test_timeline_folder_merges_its_rows_only(tmp_path):
    from featureshift.io import save_merged

    folder = tmp_path / "timeline"
    folder.mkdir()
    for e in (0, 1, 10):
        Image.new("RGB", (30, 10), (e * 20, 0, 0)).save(folder / f"{e:03d}.png")
    save_merged(folder / "merged.png", Image.new("RGB", (30, 30)), kind="timeline")
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "channel_0000.gif", save_all=True, append_images=frames[1:])
    res = merge([folder], tmp_path / "out.png")
    assert [p.name for p in res.inputs] == ["000.png", "001.png", "010.png"]
    assert sorted(p.name for p, _ in res.skipped) == ["channel_0000.gif", "merged.png"]


def test_explicit_order_and_labels(rows, tmp_path):
    files = [rows / "row10.png", rows / "row1.png"]
    kept = merge(files, tmp_path / "a.png", keep_order=True)
    assert row_colors(kept.output, 2) == [(0, 0, 255), (255, 0, 0)]
    assert merge(files, tmp_path / "b.png").inputs == [rows / "row1.png", rows / "row10.png"]
    labeled = merge(files, tmp_path / "c.png", labels=True)
    assert Image.open(labeled.output).width > Image.open(tmp_path / "b.png").width


def test_natural_key():
    names = ["epoch10.png", "epoch2.png", "epoch1.png", "Epoch3.png", "a.png"]
    assert sorted(names, key=natural_key) == ["a.png", "epoch1.png", "epoch2.png", "Epoch3.png", "epoch10.png"]


def test_bad_inputs(tmp_path, rows):
    with pytest.raises(FeatureshiftError, match="does not exist"):
        merge([tmp_path / "nope.png"], tmp_path / "out.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.png").write_text("not an image")
    with pytest.raises(FeatureshiftError, match="No images to merge.*notes.png"):
        merge([empty], tmp_path / "out.png")
    with pytest.raises(FeatureshiftError, match="must end in"):
        merge([rows], tmp_path / "out.txt")
    res = merge([rows, empty], tmp_path / "out.png")  # an unreadable file among good ones is skipped
    assert len(res.inputs) == 3 and [p.name for p, _ in res.skipped] == ["notes.png"]


def test_cli_merge(rows, tmp_path):
    before = fingerprint(rows)
    out = CliRunner().invoke(main, ["merge", str(rows), "-o", str(tmp_path / "m.png"), "--labels"])
    assert out.exit_code == 0, out.output
    assert "3 image(s)" in out.output and (tmp_path / "m.png").is_file()
    assert fingerprint(rows) == before
    out = CliRunner().invoke(main, ["merge", str(tmp_path / "missing"), "-o", str(tmp_path / "m.png")])
    assert out.exit_code == 2 and "does not exist" in out.output
