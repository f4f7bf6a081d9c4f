"""Options generated from settings fields: each default and its help are written once, on the
TrainConfig or RenderSettings field, and the command line offers and documents them from there."""
from __future__ import annotations

import dataclasses
import re

import click
import pytest
from click.testing import CliRunner

from featureshift.cli import main
from featureshift.cli_options import OBJECTIVE_FIELDS, settings_from
from featureshift.flags import Flag, default_words, flag, flagged_fields
from featureshift.optvis.settings import DEFAULT_SETTINGS, RenderSettings
from featureshift.selection import COMPARE_COLUMNS, DEFAULT_COLUMNS
from featureshift.training.config import TrainConfig


def options_of(command: str) -> dict[str, click.Option]:
    """The options of COMMAND by their parameter name."""
    return {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}


def flat_help(command: str) -> str:
    r = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


def help_of(command: str, name: str) -> str:
    option = options_of(command)[name]
    return " ".join(option.help.split())


def test_every_training_option_is_a_train_flag_whose_help_names_the_fields_default():
    train = options_of("train")
    for f in dataclasses.fields(TrainConfig):
        assert f.name in train, f"TrainConfig.{f.name} has no flag"
        assert train[f.name].default is None  # "not given": a TOML file's or a resumed run's value stays
        words = default_words(f)
        if words is not None and not f.metadata["flag"].switch:
            assert help_of("train", f.name).endswith(f"[default: {words}]"), f.name
    assert "[default: 32]" in help_of("train", "batch_size") and "[default: 0.001]" in help_of("train", "lr")
    assert "[default: off]" in help_of("train", "nesterov") and "[default: on]" in help_of("train", "augment")


def test_every_render_setting_with_a_flag_is_an_option_of_the_rendering_commands():
    fields = [f.name for f in flagged_fields(RenderSettings)]
    assert {"steps", "size", "seed", "lr", "precision", "method", "include_cls"} <= set(fields)
    for command in ("vis", "timeline", "atlas"):
        assert set(fields) <= set(options_of(command)), command
    for command in ("compare", "report"):  # they render the channel objective only
        assert set(fields) - set(OBJECTIVE_FIELDS) <= set(options_of(command))
        assert not set(OBJECTIVE_FIELDS) & set(options_of(command))
    assert help_of("vis", "steps").endswith(f"[default: {DEFAULT_SETTINGS.steps}]")
    assert help_of("report", "steps").endswith(f"[default: as the run's timeline, else {DEFAULT_SETTINGS.steps}]")


def test_a_changed_field_default_changes_the_help(monkeypatch):
    from featureshift.cli_options import field_options

    @dataclasses.dataclass
    class Settings:
        rate: float = flag(0.25, "How fast.")
        name: str | None = flag(None, "Who.", default_text="nobody", metavar="NAME")
        loud: bool = flag(False, "Shout.", switch=True)
        hidden: int = 3

    @click.command()
    @field_options(Settings)
    def cmd(**kw):
        click.echo(repr(sorted(kw.items())))

    text = " ".join(CliRunner().invoke(cmd, ["--help"]).output.split())
    assert "--rate FLOAT How fast. [default: 0.25]" in text and "--name NAME Who. [default: nobody]" in text
    assert "--loud Shout." in text and "hidden" not in text
    assert CliRunner().invoke(cmd, ["--rate", "2", "--loud"]).output.strip() == \
        "[('loud', True), ('name', None), ('rate', 2.0)]"


def test_train_passes_only_the_flags_given(monkeypatch):
    import featureshift.commands.train as train_command

    seen = {}

    def fake_train(config_file, **kwargs):
        seen.update(kwargs, config_file=config_file)
        return "RUN"

    monkeypatch.setattr(train_command, "train", fake_train)
    r = CliRunner().invoke(main, ["train", "--data", "d", "--lr", "0.01", "--no-augment", "--cutoff", "3", "-q",
                                  "--resume", "."])
    assert r.exit_code == 0, r.output
    given = {k: v for k, v in seen.items() if not k.startswith("visualize")}
    assert given == {"config_file": None, "data": "d", "lr": 0.01, "augment": False, "cutoff": "3", "quiet": True,
                     "resume": "."}
    assert seen["visualize_channels"] == DEFAULT_COLUMNS


def test_a_bad_train_device_or_choice_is_one_line_and_exit_2():
    r = CliRunner().invoke(main, ["train", "--data", "d", "--device", "tpu"])
    assert r.exit_code == 2 and "Unknown device 'tpu'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "--data", "d", "--optimizer", "lion"])
    assert r.exit_code == 2 and "'lion' is not one of" in r.output


def test_render_options_become_render_settings_with_defaults_where_not_given():
    @click.command()
    @click.option("--x", default=None)
    def cmd(**kw):
        pass

    from featureshift.cli_options import render_options

    command = render_options(objective=True)(cmd)
    ctx = command.make_context("cmd", ["--steps", "8", "--precision", "fp32", "--include-cls", "--method", "maco"])
    options = dict(ctx.params)
    settings = settings_from(options)
    assert settings == DEFAULT_SETTINGS.replace(steps=8, precision="fp32", include_cls=True, method="maco")
    assert set(options) == {"x", "batch_size"}  # the settings were taken out; the rest stays for the command


def test_zero_render_steps_are_refused_on_the_command_line():
    r = CliRunner().invoke(main, ["vis", "squeezenet1_1", "features.3", "-o", "x.png", "--steps", "0"])
    assert r.exit_code == 2 and f"the default: {DEFAULT_SETTINGS.steps}" in r.output


@pytest.mark.parametrize("command, default", [("vis", DEFAULT_COLUMNS), ("timeline", DEFAULT_COLUMNS),
                                              ("report", DEFAULT_COLUMNS), ("compare", COMPARE_COLUMNS)])
def test_the_default_channel_count_is_the_one_selection_names(command, default):
    assert help_of(command, "columns").endswith(f"[default: {default}].")


def test_train_visualize_columns_default_is_the_selection_default():
    assert options_of("train")["columns"].default == DEFAULT_COLUMNS


def test_default_words_say_switches_as_on_off_and_numbers_as_written():
    @dataclasses.dataclass
    class S:
        a: bool = flag(True, "A.")
        b: float = flag(1e-3, "B.")
        c: int | None = flag(None, "C.")
        d: str = flag("x", "D.", default_text="as you like")

    assert [default_words(f) for f in dataclasses.fields(S)] == ["on", "0.001", None, "as you like"]
    assert dataclasses.fields(S)[0].metadata["flag"] == Flag("A.")


def test_help_examples_are_kept():
    text = flat_help("train")
    assert re.search(r"featureshift train --resume runs/g --epochs 100", text)
    assert "featureshift vis googlenet inception4a inception4c -o out.png" in flat_help("vis")
