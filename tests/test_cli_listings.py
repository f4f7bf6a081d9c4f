"""The foundation commands as a user runs them: a real process, real pipes, exit codes."""
import subprocess
import sys

import pytest

import featureshift


def run(*args, input=None):
    return subprocess.run([sys.executable, "-m", "featureshift", *args], capture_output=True, text=True, input=input)


@pytest.mark.slow
def test_layers_is_tab_separated_and_greppable():
    r = run("layers", "googlenet")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert all(len(row) == 4 for row in rows)
    inc4c = [row for row in rows if row[0].startswith("inception4c")]
    names = [row[0] for row in inc4c]
    assert "inception4c" in names and "inception4c.branch4.1" in names
    assert ["inception4c", "Inception", "512", "14x14"] in inc4c


@pytest.mark.slow
def test_layers_of_squeezenet_with_real_weights_and_of_a_snapshot(tmp_path, squeezenet):
    r = run("layers", "squeezenet1_1", "--weights", "imagenet")
    assert r.returncode == 0 and r.stdout.startswith("features.0\tConv2d\t64\t111x111")
    featureshift.save_snapshot(squeezenet, tmp_path / "000.safetensors", epoch=0)
    r2 = run("layers", str(tmp_path / "000.safetensors"))
    assert r2.returncode == 0 and r2.stdout == r.stdout


@pytest.mark.slow
def test_info_prints_metadata(tmp_path, squeezenet):
    featureshift.save_snapshot(squeezenet, tmp_path / "s.safetensors", epoch=4, metrics={"val_acc": 0.75})
    r = run("info", str(tmp_path / "s.safetensors"))
    assert r.returncode == 0
    assert "squeezenet1_1" in r.stdout and "epoch         4" in r.stdout and "val_acc 0.75" in r.stdout


@pytest.mark.slow
def test_user_errors_are_one_paragraph_without_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    for args, expected in [
        (("layers", "googlenett"), "Did you mean: googlenet"),
        (("info", str(bad)), "bad.safetensors is not a readable featureshift snapshot"),
        (("layers", "resnet18", "--weights", str(tmp_path / "missing.pth")), "neither 'imagenet', 'random'"),
    ]:
        r = run(*args)
        assert r.returncode == 2, r
        assert expected in r.stderr and "Traceback" not in r.stderr
        assert r.stderr.startswith("featureshift: error:") and r.stderr.count("\n") == 1


def test_help_explains():
    r = run("--help")
    assert r.returncode == 0 and "layers" in r.stdout and "info" in r.stdout
