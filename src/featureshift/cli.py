"""Command line: parses, calls the Python API, prints. Every command's logic lives in the API."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import FeatureshiftError

WEIGHTS_HELP = "imagenet (download-and-cache; squeezenet1_1 works offline), random, or a weights file."


def _handle_errors(fn):
    """User errors become one paragraph on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatureshiftError as e:
            click.echo(f"featureshift: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("featureshift: interrupted", err=True)
            sys.exit(130)

    return wrapper


def load_network(model_or_snapshot: str, weights: str):
    """A model name, or a snapshot file: the one way every command opens a network."""
    from . import load

    return load(model_or_snapshot, weights=weights)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featureshift")
def main():
    """featureshift: see what transfer learning does to a network.

    Fine-tune a pretrained classifier with snapshots (train), render what its neurons
    respond to (vis), follow the same neurons through training (timeline), measure how
    much each one changed (compare) and open it all in a browser (report).
    """


@main.command()
@click.argument("model")
@click.option("--weights", default="random", show_default=True,
              help="The listing does not depend on the weights, so none are downloaded by default. " + WEIGHTS_HELP)
@click.option("--size", type=int, default=None, help="Input size for the spatial sizes [default: the model's own].")
@click.option("--header/--no-header", default=False, help="Print a header line first.")
@_handle_errors
def layers(model, weights, size, header):
    """List the visualizable layers of MODEL (a model name or a snapshot file).

    One line per module whose output is a 4-D feature map, in forward-execution order:
    name, type, channels, HxW at the input size, tab-separated for grep and cut.
    The names can be passed straight to vis, timeline and compare:

    \b
      featureshift layers googlenet | grep inception4c
    """
    from .models import list_layers

    net, _ = load_network(model, weights)
    if header:
        click.echo("name\ttype\tchannels\tsize")
    for layer in list_layers(net, size):
        click.echo(layer.row())


@main.command()
@click.argument("snapshot", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@_handle_errors
def info(snapshot, as_json):
    """Print the metadata of a SNAPSHOT file (architecture, classes, epoch, metrics, config)."""
    import json

    from .snapshot import read_meta

    meta = read_meta(snapshot)
    d = meta.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
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


# Commands of the other capabilities are registered below, one section each.
# --- train (issue 3) ---
# --- vis (issue 4) ---
# --- timeline / merge (issue 5) ---
# --- compare / report (issue 6) ---


if __name__ == "__main__":
    main()
