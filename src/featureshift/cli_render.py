"""The rendering commands' command lines: vis, timeline, atlas, compare and report. Each parses,
calls the Python API of the same name and prints; cli.py adds them to the `featureshift` group.
Nothing heavy is imported here either.
"""
from __future__ import annotations

import sys

import click

from .cli_options import (channel_options, device_option, floor_option, force_option, handle_errors,
                          layers_from_stdin, model_argument, model_options, preprocessing_options, probe_options,
                          quiet_option, ray_option, render_options, settings_from, warn)
from .errors import FeatureshiftError
from .selection import COMPARE_COLUMNS, DEFAULT_COLUMNS, check_exclusive
from .training.config import WEIGHTS_HELP


@click.command()
@click.argument("model_or_snapshot")
@click.argument("layers", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The grid image (.png). Each tile is also saved as OUTPUT_tiles/<layer>_<channel>.png.")
@channel_options(default=DEFAULT_COLUMNS)
@render_options(objective=True)
@device_option
@click.option("--labels/--no-labels", default=True, show_default=True,
              help="Label rows with the layer and columns with the channel.")
@click.option("--weights", default="imagenet", show_default=True,
              help="For a model name: " + WEIGHTS_HELP + " Ignored for a snapshot.")
@model_options
@ray_option
@quiet_option
@handle_errors
def vis(model_or_snapshot, layers, output, columns, channels, device, batch_size, labels, weights, mean, std,
        input_size, in_chans, img_size, ray, quiet, **render):
    """Render what channels of LAYERS respond to (feature visualization), as one grid image.

    Rows are layers, columns channels. LAYERS are names from `featureshift layers`; the
    layer 'logits' is the network output (channels = classes). A single '-' reads layer
    names from standard input, the first tab-separated field of each line:

    \b
      featureshift vis googlenet inception4a inception4c -o out.png --columns 5
      featureshift layers googlenet | grep inception4c | \\
          featureshift vis run/snapshots/003.safetensors - -o sample.png --columns 5
      featureshift vis squeezenet1_1 logits --channels 1,130,949 --objective logit -o classes.png
      featureshift vis squeezenet1_1 features.12 --columns 4 --method maco -o maco.png
      featureshift vis squeezenet1_1 features.9 --columns 4 --method accent --image cat.jpg -o accent.png

    Lucid's method: 1/f Fourier parameterization with decorrelated colors, random pad, jitter,
    scale and rotation, Adam. `--steps 2048 --size 144 --lr 0.05 --lr-hold 1` reproduces the original tool.
    """
    from .commands.vis import vis as vis_api

    names: list[str] = []
    for name in layers:
        names += layers_from_stdin(sys.stdin) if name == "-" else [name]
    model = model_argument(model_or_snapshot, weights, mean, std, input_size, in_chans, img_size)
    result = vis_api(model, list(dict.fromkeys(names)), output, columns=columns, channels=channels,
                     settings=settings_from(render), weights=weights, device=device, batch_size=batch_size,
                     labels=labels, quiet=quiet, ray=ray)
    for warning in result.warnings:
        warn(warning)
    click.echo(result.summary())


@click.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--layer", "layers", multiple=True, required=True,
              help="Layer to follow (repeat for several); `featureshift layers MODEL` lists them, "
                   "'logits' means the classes.")
@channel_options(default=DEFAULT_COLUMNS)
@click.option("--snapshots", default=None, help="Epochs to use, e.g. 0,1,5-10 [default: every snapshot].")
@click.option("--every", type=int, default=None, help="Use the snapshots whose epoch is a multiple of N.")
@render_options(objective=True)
@device_option
@force_option
@click.option("--labels/--no-labels", default=True, help="Epoch, accuracy and channel labels, or a bare grid.")
@ray_option
@preprocessing_options
@quiet_option
@handle_errors
def timeline(run, layers, columns, channels, snapshots, every, device, batch_size, force, labels, ray, mean, std,
             input_size, quiet, **render):
    """Render the same channels on every snapshot of the training run RUN, or on every ONNX file
    in the folder RUN (in natural order of the names: epoch2 before epoch10).

    Each row is one snapshot in training order (the first is before training), each column
    one channel. Writes RUN/timeline/<layer>/: one row image per snapshot, merged.png and an
    animated GIF per channel. Tiles are cached by snapshot checksum and settings, so a rerun
    renders only new snapshots or changed settings, and an interrupted run resumes.

    A snapshot that cannot be read (truncated, damaged) gets a row marked missing and the
    rest is rendered and written; then the file is named on stderr, with how to restore it or
    leave it out, and the exit status is 2.

    \b
      featureshift timeline runs/flowers --layer inception4c.branch4.1 --columns 5
      featureshift timeline runs/flowers --layer features.6 --channels 0-3,17 --every 5
      featureshift timeline runs/flowers --layer inception5b --columns 1024 --ray auto
      featureshift timeline runs/flowers --layer inception4c --method accent --image flower.jpg
      featureshift timeline onnx-epochs/ --layer inception4c.Concat --columns 8
    """
    from .commands.timeline import timeline as timeline_api

    check_exclusive(columns, channels)
    result = timeline_api(run, list(layers), channels if channels is not None else (columns or DEFAULT_COLUMNS),
                          snapshots=snapshots, every=every, settings=settings_from(render), device=device,
                          batch_size=batch_size, force=force, labels=labels, quiet=quiet, ray=ray, mean=mean,
                          std=std, input_size=input_size)
    click.echo(result.summary())
    if result.unreadable():
        raise FeatureshiftError(result.unreadable())


@click.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--layer", "layers", multiple=True, help="Layer to atlas (repeat for several); `featureshift layers "
              "RUN/snapshots/000.safetensors` lists them.")
@click.option("--all-layers", is_flag=True, help="Every layer the listing shows (large networks: many tiles; see "
              "--dry-run first).")
@click.option("--snapshots", default="first,last", show_default=True,
              help="Which snapshots: first,last | all | epochs like 0,5,10 | first,5,last.")
@click.option("--channels", default=None, help="Only these channels of each layer, e.g. 0-63  [default: all].")
@render_options(objective=True)
@device_option
@ray_option
@click.option("--dry-run", is_flag=True, help="Print how many tiles would render and about how long, then stop.")
@force_option
@floor_option
@quiet_option
@handle_errors
def atlas(run, layers, all_layers, snapshots, channels, device, batch_size, ray, dry_run, force, floor, quiet,
          **render):
    """Render every channel of layers of the run RUN before and after fine-tuning (an atlas).

    Tiles go into the same cache as timelines (an atlas after a timeline reuses its tiles;
    a rerun renders only what is missing) and are recorded in RUN/atlas.json, so the report
    shows every atlased channel: before/after thumbnails sortable by each measure, a page
    per channel, and the most changed neurons of the network. Before rendering it prints
    how many tiles it will render and an estimate of the time, measured on this machine, on
    stderr (--dry-run: on stdout, and stops there).

    A snapshot that cannot be read (truncated, damaged) is left out and the rest is rendered
    and recorded; then the file is named on stderr, with how to restore it or leave it out,
    and the exit status is 2.

    \b
      featureshift atlas runs/flowers --layer inception4c --dry-run
      featureshift atlas runs/flowers --layer inception4c --layer inception5b --ray auto
      featureshift atlas runs/flowers --all-layers --snapshots all --steps 64 --size 64
    """
    from .commands.atlas import atlas as atlas_api

    result = atlas_api(run, list(layers), all_layers=all_layers, snapshots=snapshots, channels=channels,
                       settings=settings_from(render), device=device, batch_size=batch_size, ray=ray,
                       dry_run=dry_run, force=force, quiet=quiet, floor=floor)
    click.echo(result.summary())
    if result.unreadable():
        raise FeatureshiftError(result.unreadable())


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--layer", required=True, help="The layer to compare; `featureshift layers A` lists them.")
@channel_options(default=COMPARE_COLUMNS, most_changed=True)
@click.option("--by", type=click.Choice(["weight", "correlation", "drift", "cross"]), default="weight",
              show_default=True,
              help="Measure to rank by: weight change, 1 - correlation (needs probe images), visual drift or "
                   "1 - cross-activation (these two render every channel of the layer).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The sheet to write (.png) [default: compare-LAYER.png].")
@click.option("--weights", default="imagenet", show_default=True, help="For A or B given as a model name. " + WEIGHTS_HELP)
@click.option("--rows", "table_rows", type=int, default=5, show_default=True,
              help="Channels listed as most and as least changed.")
@click.option("--diff", is_flag=True,
              help="Two more rows: what each channel gained (the picture B responds to more than A) and what it "
                   "lost (A more than B), A and B rendered together (docs/render.md).")
@floor_option
@probe_options
@render_options(objective=False)
@device_option
@model_options
@ray_option
@quiet_option
@handle_errors
def compare(a, b, layer, columns, channels, most_changed, by, output, weights, table_rows, diff, floor, probe,
            probe_limit, image_size, device, batch_size, mean, std, input_size, in_chans, img_size, ray, quiet,
            **render):
    """Compare LAYER of two networks A and B, channel by channel.

    A and B are snapshot files (e.g. RUN/snapshots/000.safetensors and RUN/snapshots/010.safetensors)
    or model names (with --weights), e.g. the ImageNet original against a fine-tuned snapshot. Writes
    a sheet with each channel's render at A above its render at B (same seed), labelled with its
    measures, and prints the most and least changed channels of the layer. CKA and correlation use
    --probe, or the validation images of the run that A or B belongs to. Measures: docs/metrics.md.

    \b
      featureshift compare runs/f/snapshots/000.safetensors runs/f/snapshots/050.safetensors \\
          --layer inception4c --most-changed 8 -o changed.png
      featureshift compare runs/f/snapshots/000.safetensors runs/f/snapshots/050.safetensors \\
          --layer inception4c --channels 3,17 --diff -o gained-lost.png
    """
    from .commands.compare import compare as compare_api
    from .io import safe_name

    a, b = (model_argument(x, weights, mean, std, input_size, in_chans, img_size) for x in (a, b))
    result = compare_api(a, b, layer, columns=columns, channels=channels, most_changed=most_changed, by=by,
                         output=output or f"compare-{safe_name(layer)}.png", probe=probe, probe_limit=probe_limit,
                         image_size=image_size, weights=weights, settings=settings_from(render), device=device,
                         batch_size=batch_size, quiet=quiet, ray=ray, diff=diff, floor=floor)
    click.echo(result.table(table_rows))
    click.echo(f"sheet: {result.output}")


@click.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--layer", "layers", multiple=True,
              help="Layer to render and rank channel by channel (repeat for several) [default: the layers the run "
                   "has timelines of, else one two thirds up the network].")
@channel_options(default=DEFAULT_COLUMNS)
@click.option("--examples", type=int, default=6, show_default=True, help="Dataset examples per channel and snapshot.")
@probe_options
@render_options(objective=False, inherit=True)
@device_option
@click.option("--accent/--no-accent", default=True, show_default=True,
              help="On the channel pages of the timelines' channels: the channel's top dataset example, "
                   "accentuated at every snapshot (a render per channel and snapshot, cached).")
@floor_option
@click.option("--diff/--no-diff", default=True, show_default=True,
              help="On the channel pages of the timelines' and the most changed channels: what each gained and lost "
                   "from the first to the last snapshot (two renders per channel, of both snapshots at once, cached).")
@click.option("--checks/--no-checks", default=True, show_default=True,
              help="Check every rendered picture against the probe images (a badge per tile; docs/metrics.md, "
                   "\"Self-checks\"): --no-checks saves their few seconds.")
@click.option("--open", "open_browser", is_flag=True, help="Open the report in the web browser.")
@ray_option
@quiet_option
@handle_errors
def report(run, layers, columns, channels, examples, probe, probe_limit, image_size, device, batch_size, accent,
           floor, diff, checks, open_browser, ray, quiet, **render):
    """Write the HTML report of the training run RUN to RUN/report/ and print its path.

    A static folder that opens from disk (no server, no network): configuration and dataset,
    training curves, weight change and CKA of every stage over the epochs, the timelines, a page
    per layer with its channels sortable by each measure, and a page per rendered channel with
    its render at every snapshot (a slider), its dataset examples before and after, and its
    measures over time; the pages of the timelines' and the most changed channels also show what
    each gained and lost and the probe images whose activation rose and fell most. Renders come from the timeline cache (only missing ones are rendered),
    probe statistics from RUN/metrics/cache; the measures are also written to RUN/metrics/.

    \b
      featureshift report runs/flowers --layer inception4c --columns 8 --open
    """
    from .commands.report import build_report

    check_exclusive(columns, channels)
    index = build_report(run, list(layers) or None, channels if channels is not None else columns, probe=probe,
                         probe_limit=probe_limit, image_size=image_size, examples=examples, device=device,
                         batch_size=batch_size, accent=accent, floor=floor, diff=diff, checks=checks,
                         open_browser=open_browser, quiet=quiet, ray=ray,
                         **{k: v for k, v in render.items() if v is not None})
    click.echo(str(index))
