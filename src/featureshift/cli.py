"""Command line: parses, calls the Python API of the same name, prints.

Every command's work lives in `featureshift.commands.*` (or, for the listings, in the
foundations); this module only turns flags into arguments and results into lines. The
options several commands share, and those generated from TrainConfig's and RenderSettings'
fields, are in cli_options.py; the rendering commands in cli_render.py. It imports nothing
heavy, so `--help`, `--version` and argument errors answer at once.
"""
from __future__ import annotations

import os

import click

from .cli_options import (device_callback, field_options, handle_errors, model_options, pipe_safe,
                          preprocessing_options, quiet_option, steps_callback)
from .cli_render import atlas, compare, report, timeline, vis
from .optvis.settings import DEFAULT_SETTINGS
from .selection import DEFAULT_COLUMNS
from .training.config import WEIGHTS_HELP, TrainConfig
from .version import __version__


class Group(click.Group):
    """Click prints --help and --version itself, outside any command, and turns a closed pipe
    there into exit 1; parsing (make_context) and dispatch (invoke) end as quietly as a command."""

    make_context = pipe_safe(click.Group.make_context)
    invoke = pipe_safe(click.Group.invoke)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featureshift")
def main():
    """featureshift: see what transfer learning does to a network.

    Fine-tune a pretrained classifier with snapshots (train), render what its neurons
    respond to (vis), follow the same neurons through training (timeline), measure how
    much each one changed (compare) and open it all in a browser (report).

    \b
      featureshift demo                      # everything, offline, in under a minute
      featureshift layers googlenet | grep inception4c
      featureshift COMMAND --help            # each command's options and examples
    """
    # Before torch loads OpenMP, in this process only: spinning worker threads make every CPU op
    # 10-20x slower as soon as another process wants the same cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ---------------------------------------------------------------- listings

@main.command()
@click.argument("model")
@click.option("--weights", default="random", show_default=True,
              help="The listing does not depend on the weights, so none are downloaded by default. " + WEIGHTS_HELP)
@click.option("--size", type=int, default=None,
              help="Input size for the spatial sizes  [default: the size a snapshot was trained at, else the "
                   "model's own].")
@click.option("--header/--no-header", default=False, help="Print a header line first.")
@model_options
@quiet_option
@handle_errors
def layers(model, weights, size, header, mean, std, input_size, in_chans, img_size, quiet):
    """List the visualizable layers of MODEL (a model name, a snapshot or an ONNX file).

    One line per module whose output is a 4-D feature map, in forward-execution order:
    name, type, channels, HxW at the input size, tab-separated for grep and cut.
    The names can be passed straight to vis, timeline and compare. An ONNX file needs no
    --mean/--std for the listing (only its input size, when its graph leaves it open):

    \b
      featureshift layers googlenet | grep inception4c
      featureshift layers runs/flowers/snapshots/010.safetensors --header | cut -f1,3
      featureshift layers model.onnx --input-size 48x192
    """
    from .models.layers import list_layers
    from .models.onnx.common import is_onnx_path
    from .network import open_network

    if is_onnx_path(model):
        from .models.onnx.convert import import_onnx

        imported = import_onnx(model, mean=mean, std=std, input_size=input_size or size, require_preprocessing=False)
        module = imported.module
        if imported.unknown and not quiet:
            click.echo(f"featureshift: note: {model} does not say how to normalize its input (no "
                       f"{' and '.join(imported.unknown)} in its metadata). The listing does not need it; vis, "
                       "timeline and compare do: give them --mean and --std, or write them into the file once "
                       f"with `featureshift export {model} -o OUT.onnx --mean R,G,B --std R,G,B`.", err=True)
    else:
        module = open_network(model, weights, progress=not quiet, mean=mean, std=std, input_size=input_size,
                              in_chans=in_chans, image_size=img_size).module
    if header:
        click.echo("name\ttype\tchannels\tsize")
    for layer in list_layers(module, size):
        click.echo(layer.row())


@main.command()
@click.argument("snapshot", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@quiet_option
@handle_errors
def info(snapshot, as_json, quiet):
    """Print the metadata of a SNAPSHOT file (architecture, classes, epoch, metrics, config), or
    what an ONNX file carries (producer, opset, input, classes, featureshift's metadata).

    \b
      featureshift info runs/flowers/snapshots/010.safetensors
      featureshift info runs/flowers/snapshots/010.safetensors --json | jq .metrics
      featureshift info model.onnx
    """
    import json

    from .snapshot import read_meta

    if snapshot.lower().endswith(".onnx"):
        from .models.onnx.metadata import describe

        about = describe(snapshot)
        if as_json:
            click.echo(json.dumps(about, indent=2, default=str))
            return
        for k, v in about.items():
            if k != "featureshift":
                click.echo(f"{k:<13} {'-' if v is None else v}")
        click.echo("featureshift" + ("" if about["featureshift"] else "  - (no featureshift metadata)"))
        for k, v in about["featureshift"].items():
            if isinstance(v, list) and len(v) > 10:
                v = ", ".join(map(str, v[:10])) + f", ... ({len(v)} in all)"
            click.echo(f"  {k:<18} {v}")
        return
    meta = read_meta(snapshot)
    if as_json:
        click.echo(json.dumps(meta.to_dict(), indent=2, default=str))
        return
    i = meta.info
    classes = ", ".join(i.class_names[:10]) + (f", ... ({i.num_classes} in all)" if i.num_classes > 10 else "")
    rows = [
        ("file", snapshot), ("architecture", i.arch), ("weights from", i.weights),
        ("classes", classes), ("input", f"{i.input_size}px, mean {list(i.mean)}, std {list(i.std)}"),
        ("epoch", meta.epoch), ("metrics", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in meta.metrics.items()) or "-"),
        ("checksum", meta.checksum), ("parent", meta.parent or "-"), ("created", meta.created),
        ("featureshift", meta.version),
    ]
    for k, v in rows:
        click.echo(f"{k:<13} {v}")
    if meta.config:
        click.echo("config")
        for k, v in meta.config.items():
            click.echo(f"  {k:<18} {v}")


@main.command()
@click.argument("pattern", required=False)
@quiet_option
@handle_errors
def models(pattern, quiet):
    """List the model names --model accepts (torchvision builders; timm/<name> when timm is installed).

    PATTERN keeps the names that contain it.

    \b
      featureshift models incep
      featureshift models timm/vit | head
    """
    from .models.zoo import available_models

    for name in available_models():
        if not pattern or pattern.lower() in name.lower():
            click.echo(name)


# ---------------------------------------------------------------- train, demo

@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A TOML file of options (keys as the flags, with _ or -); flags given here override it.")
@field_options(TrainConfig, extra={"device": {"callback": device_callback}})
@click.option("--visualize", multiple=True, metavar="LAYER", help="Render LAYER's first --columns channels on each "
              "snapshot as soon as it is written, into RUN/timeline/LAYER/merged.png (repeat for several layers).")
@click.option("--columns", type=int, default=DEFAULT_COLUMNS, show_default=True,
              help="Channels per row with --visualize.")
@click.option("--vis-steps", type=int, default=DEFAULT_SETTINGS.steps, show_default=True, callback=steps_callback,
              help="Render steps with --visualize.")
@click.option("--vis-size", type=int, default=DEFAULT_SETTINGS.size, show_default=True,
              help="Render size with --visualize.")
@handle_errors
def train(config_file, visualize, columns, vis_steps, vis_size, **options):
    """Fine-tune a pretrained classifier, saving snapshots before training and every K epochs.

    The run folder gets snapshots/NNN.safetensors (000 = before training), metrics.jsonl
    (per epoch: loss and accuracy on training and validation data, learning rate, seconds),
    run.json (resolved settings, versions, dataset summary) and what --resume needs. The
    folder's path is printed when training ends.

    \b
      featureshift train --model googlenet --data flowers17 --epochs 50 --cutoff inception4c --out runs/g
      featureshift train --config run.toml --lr 3e-4
      featureshift train --resume runs/g --epochs 100
      featureshift train --model squeezenet1_1 --data tex --visualize features.9 --columns 8 --out runs/t
      featureshift train --model googlenet --data big --nproc 4 --batch-size 256 --out runs/ddp
      torchrun --nproc_per_node 8 --nnodes 2 ... -m featureshift train --data big --out runs/ddp
    """
    from .commands.train import train as train_api

    given = {k: v for k, v in options.items() if v is not None}
    run = train_api(config_file, visualize=list(visualize), visualize_channels=columns,
                    visualize_settings=DEFAULT_SETTINGS.replace(steps=vis_steps, size=vis_size), **given)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns here
        click.echo(str(run))


@main.command()
@click.option("--out", default="demo-run", show_default=True, help="Folder for the demo's dataset and run.")
@quiet_option
@handle_errors
def demo(out, quiet):
    """Run featureshift end to end on a generated dataset (no download, under a minute on a 2-core CPU).

    Fine-tunes the ImageNet SqueezeNet on textures it draws itself, with a snapshot
    after every epoch, into OUT/run, renders a timeline and writes the report; prints the
    report's path.

    \b
      featureshift demo --out /tmp/demo && xdg-open /tmp/demo/run/report/index.html
    """
    from .commands.demo import run_demo

    click.echo(str(run_demo(out, quiet=quiet)))


# ---------------------------------------------------------------- files

@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The image to write (.png).")
@click.option("--labels", is_flag=True, help="Write each file's name to the left of its row.")
@click.option("--keep-order", is_flag=True, help="Stack in the order given instead of natural numeric order.")
@click.option("--title", default=None, help="A title above the stack.")
@quiet_option
@handle_errors
def merge(inputs, output, labels, keep_order, title, quiet):
    """Stack images (files, or folders of them) top to bottom into one.

    Natural numeric order (epoch2 before epoch10); any sizes, padded. The inputs are only
    read, never renamed or moved, and the output or any earlier featureshift stack is
    never taken as an input.

    \b
      featureshift merge rows/ -o merged.png --labels
      featureshift merge old-tool-pictures/epoch*.png -o merged.png --title "inception4c"
    """
    from .commands.merge import merge as merge_api

    result = merge_api(inputs, output, labels=labels, keep_order=keep_order, title=title)
    for path, why in result.skipped:
        click.echo(f"skipped {path}: {why}", err=True)
    if not quiet:
        click.echo(f"{len(result.inputs)} image(s) -> {result.output}")


@main.command()
@click.argument("snapshot_or_model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write.")
@click.option("--weights", default="imagenet", show_default=True, help="For a model name. " + WEIGHTS_HELP)
@click.option("--opset", type=int, default=None,
              help="ONNX opset to write  [default: 17, or 18 where a vision transformer needs it to take any "
                   "image size].")
@click.option("--tolerance", type=float, default=1e-3, show_default=True,
              help="Largest difference allowed between the network and the ONNX graph (onnxruntime) on a random "
                   "batch, relative to max(1, largest |logit|); above it nothing is written.")
@click.option("--check/--no-check", default=True, show_default=True, help="Check the export with onnxruntime.")
@preprocessing_options
@quiet_option
@handle_errors
def export(snapshot_or_model, output, weights, opset, tolerance, check, mean, std, input_size, quiet):
    """Write a snapshot (or a model) as an ONNX file, with its classes and preprocessing in the metadata.

    The export is checked with onnxruntime on a random batch: the largest difference is
    printed, and above --tolerance nothing is written. Given an ONNX file, the graph is copied
    unchanged and --mean/--std/--input-size are written into its metadata. Needs
    `pip install 'featureshift[onnx]'`.

    \b
      featureshift export runs/flowers/snapshots/010.safetensors -o flowers-010.onnx
      featureshift export model.onnx -o model.fs.onnx --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 --input-size 299
    """
    from .commands.export import export as export_api

    result = export_api(snapshot_or_model, output, weights=weights, opset=opset, tolerance=tolerance, check=check,
                        mean=mean, std=std, input_size=input_size)
    if not quiet:
        click.echo(result.describe())


@main.command("compare-runs")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the comparison to this file: JSON for a name ending in .json, else the table.")
@quiet_option
@handle_errors
def compare_runs(runs, output, quiet):
    """Set the measures of runs that differ in one setting side by side (e.g. images per class, cutoff).

    Per run the final accuracy, and per layer the speed of adaptation, the shares of kept,
    repurposed and died channels and the coarsening of its features, with the settings in
    which the runs differ named. Build each run's report first (`featureshift report RUN`).

    \b
      featureshift compare-runs runs/flowers-10pc runs/flowers-full -o small-data.json
    """
    from .commands.compare_runs import compare_runs as compare_runs_api

    click.echo(compare_runs_api(list(runs), output=output, quiet=quiet).table())


for command in (vis, timeline, atlas, compare, report):
    main.add_command(command)


if __name__ == "__main__":
    main()
