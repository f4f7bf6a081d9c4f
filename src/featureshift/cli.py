"""Command line: parses, calls the Python API of the same name, prints.

Every command's work lives in `featureshift.commands.*` (or, for the listings, in the
foundations); this module only turns flags into arguments and results into lines.
It imports nothing heavy, so `--help`, `--version` and argument errors answer at once.
"""
from __future__ import annotations

import functools
import os
import sys

import click

from .device import DEVICE_CHOICES, check_device_spec
from .errors import FeatureshiftError
from .io import WRITE_ERRNOS, write_error
from .optvis.settings import DEFAULT_SETTINGS, LUCID_LR_BUDGET, METHOD_LR, METHODS, OBJECTIVES, PARAMS, PRECISIONS
from .version import __version__

WEIGHTS_HELP = "imagenet (download-and-cache; squeezenet1_1 works offline), random, or a weights file."
# A writer killed by SIGPIPE exits 128 + 13 in every shell; coreutils do the same.
EXIT_BROKEN_PIPE = 141


def _quiet_stdout() -> None:
    """After the reader of our output went away: send the rest nowhere, so Python's own
    flush at exit does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


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
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(EXIT_BROKEN_PIPE)
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            message = write_error(e, "Finished tiles and snapshots are kept",
                                  "run the same command again (a training run continues with "
                                  "`featureshift train --resume RUN`)")
            click.echo(f"featureshift: error: {message}", err=True)
            sys.exit(2)

    return wrapper


def _warn(text: str) -> None:
    click.echo(f"featureshift: warning: {text}", err=True)


# ---------------------------------------------------------------- shared options

def _device_callback(ctx, param, value):
    try:
        return check_device_spec(value)
    except FeatureshiftError as e:
        raise click.BadParameter(str(e)) from None


def _steps_callback(ctx, param, value):
    # The API renders 0 steps on purpose (the starting noise, to compare a render with); from the
    # command line it only writes tiles that were never optimized, under the name of a render.
    if value is not None and value < 1:
        raise click.BadParameter(f"{value} steps would write the starting noise as the picture, never "
                                 f"optimized; give 1 or more (the default: {DEFAULT_SETTINGS.steps}).")
    return value


def device_option(fn):
    return click.option("--device", default="auto", show_default=True, callback=_device_callback,
                        help=f"Where to run: {DEVICE_CHOICES} (auto: a CUDA GPU, else MPS, else the CPU).")(fn)


def ray_option(fn):
    return click.option(
        "--ray", default=None, metavar="auto|ADDRESS",
        help="Render on Ray: 'auto' starts an instance on this machine (its GPUs and CPUs), HOST:PORT joins a "
             "running cluster (`ray start --head`), 'local' renders here  [default: $FEATURESHIFT_RAY_ADDRESS, "
             "else here]. Needs pip install 'featureshift[ray]'.")(fn)


def quiet_option(fn):
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars or progress lines (warnings and "
                        "errors still go to stderr).")(fn)


def option_group(*opts):
    """One decorator for several click options, shown in --help in the order given (click applies
    decorators bottom-up, so they are applied in reverse)."""
    def wrap(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return wrap


def channel_options(default: int, most_changed: bool = False):
    """--columns / --channels (/ --most-changed): the one way to choose channels."""
    opts = [
        click.option("--columns", type=int, default=None, help=f"The first N channels  [default: {default}]."),
        click.option("--channels", "channels", default=None, help="These channels instead, e.g. 0-4,17."),
    ]
    if most_changed:
        opts.append(click.option("--most-changed", type=int, default=None,
                                 help="The N channels that changed most (see --by)."))

    return option_group(*opts)


def render_options(objective: bool, inherit: bool = False):
    """The options of RenderSettings. With inherit=True they default to None: "as the run's
    timeline of the layer, else the usual default" (the report)."""
    d = DEFAULT_SETTINGS

    def opt(flag, value, text, **kw):
        if inherit:
            return click.option(flag, default=None, help=f"{text}  [default: as the run's timeline, else {value}].", **kw)
        return click.option(flag, default=value, show_default=True, help=text, **kw)

    opts = [
        opt("--steps", d.steps, "Optimization steps per image (the original tool: 2048).", type=int,
            callback=_steps_callback),
        opt("--size", d.size, "Image size in pixels (the original tool: 144).", type=int),
        opt("--seed", d.seed, "Seed of each channel's starting noise and transforms; same seed, same image.",
            type=int),
        click.option("--lr", type=float, default=None,
                     help="Adam learning rate  [default: " + ("as the run's timeline, else " if inherit else "")
                     + f"lucid: {METHOD_LR['lucid'][0]:g}, or {LUCID_LR_BUDGET:g}/steps where that is lower; "
                     + ", ".join(f"{m}: {lr:g}" for m, (lr, _, _) in METHOD_LR.items() if m != "lucid")
                     + "; Lucid's own recipe: 0.05]."),
        click.option("--lr-hold", type=float, default=None,
                     help="The fraction of the steps at the full learning rate, after which it falls linearly  "
                          f"[default: {METHOD_LR['lucid'][1]:g} (lucid), 1 (maco, accent); Lucid's: 1, constant]."),
        click.option("--lr-final", type=float, default=None,
                     help="The learning rate at the last step, as a fraction of --lr  "
                          f"[default: {METHOD_LR['lucid'][2]:g} (lucid), 1 (maco, accent)]."),
        opt("--param", d.param, "Image parameterization: 1/f-scaled Fourier spectrum, or plain pixels.",
            type=click.Choice(PARAMS)),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="The network's arithmetic during a render: auto is bf16 on CUDA and on CPUs with "
                          "native bf16 (AMX or AVX-512 BF16), where it is about 1.5x faster, else fp32  "
                          "[default: auto]."),
    ]
    if objective:
        opts += [
            click.option("--objective", type=click.Choice(OBJECTIVES), default=d.objective, show_default=True,
                         help="channel: spatial mean; neuron: center position; negative: minimize; logit: class "
                              "logit (layer 'logits', channels = class indices); diversity: several different "
                              "images per channel."),
            click.option("--diversity", type=int, default=None,
                         help="Images per channel, pushed apart by a Gram-matrix penalty  [default: 4 with "
                              "--objective diversity, else 1]."),
            click.option("--diversity-weight", type=float, default=d.diversity_weight, show_default=True,
                         help="Weight of the diversity penalty (Lucid's; it depends on the scale of the layer's "
                              "activations)."),
        ]
    opts += [
        click.option("--method", type=click.Choice(METHODS), default=None,
                     help="lucid: Lucid's recipe (1/f spectrum, transforms); maco: only the Fourier phase is "
                          "optimized, the magnitude fixed to a natural-image spectrum (the run's own images "
                          "where there is a run); accent: start from --image and change it only as much as the "
                          "channel needs  [default: lucid]."),
        click.option("--image", type=click.Path(dir_okay=False), default=None,
                     help="--method accent: the photo to accentuate (the same photo on every snapshot)."),
        click.option("--accent-weight", type=float, default=None,
                     help=f"--method accent: how strongly the picture is held to the photo  "
                          f"[default: {d.accent_weight}]."),
        click.option("--spectrum", type=click.Path(dir_okay=False), default=None,
                     help="--method maco: a magnitude spectrum file (.npz/.npy)  [default: the run's training "
                          "images, else the spectrum shipped with featureshift]."),
        click.option("--crops", type=int, default=None, help=f"--method maco: random crops per step  "
                     f"[default: {d.crops}]."),
        click.option("--noise", type=float, default=None, help=f"--method maco: noise added each step  "
                     f"[default: {d.noise}]."),
    ]
    opts.append(click.option("--include-cls/--no-include-cls", "include_cls", default=None,
                             help="Token layers of vision transformers: average a unit over the class (prefix) "
                                  "tokens too, not the patch tokens only  [default: patch tokens only]."))
    opts.append(click.option("--batch-size", type=int, default=None,
                             help="Images optimized at once  [default: as many as memory allows]."))

    return option_group(*opts)


def settings_from(options: dict):
    """RenderSettings from the render options a command received (None: keep the default)."""
    keys = ("steps", "size", "seed", "lr", "lr_hold", "lr_final", "param", "precision", "objective", "diversity",
            "diversity_weight", "include_cls",
            "method", "image", "accent_weight", "spectrum", "crops", "noise")
    return DEFAULT_SETTINGS.replace(**{k: options.pop(k) for k in keys if k in options})


def _floats(ctx, param, value):
    # One number per band; the ONNX loader checks the count against the graph (RGB values are
    # fitted to graphs of other band counts).
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of numbers, e.g. 0.485,0.456,0.406.")
    if not numbers:
        raise click.BadParameter("give one number per input band, e.g. 0.485,0.456,0.406.")
    return numbers


def _input_size(ctx, param, value):
    # "224" or HEIGHTxWIDTH ("48x192"): text and detection networks are not square
    if value is None:
        return None
    from .models.onnx.common import parse_size

    try:
        return parse_size(value)
    except FeatureshiftError as e:
        raise click.BadParameter(str(e))


# --mean/--std/--input-size: the preprocessing of an ONNX file that does not carry its own.
preprocessing_options = option_group(
    click.option("--mean", callback=_floats, default=None, metavar="R,G,B",
                 help="For an ONNX model without featureshift metadata: the input normalization's mean "
                      "(torchvision's: 0.485,0.456,0.406)."),
    click.option("--std", callback=_floats, default=None, metavar="R,G,B",
                 help="For an ONNX model without featureshift metadata: the normalization's std "
                      "(torchvision's: 0.229,0.224,0.225)."),
    click.option("--input-size", callback=_input_size, default=None, metavar="N|HxW",
                 help="For an ONNX model without featureshift metadata: its input size in pixels, or "
                      "HEIGHTxWIDTH (48x192) for one that is not square."),
)


# How to build a network that its name or file alone does not say: the input bands and build size
# of a timm model, and the preprocessing of an ONNX file.
model_options = option_group(
    click.option("--in-chans", type=int, default=3, show_default=True,
                 help="For a model name: input bands (1 grayscale, 3 RGB, N multi-band; timm models)."),
    click.option("--img-size", type=int, default=None,
                 help="For a vision transformer's name: the image size it is built for (timm's img_size)."),
    preprocessing_options,
)


def model_argument(spec: str, weights: str, mean, std, input_size, in_chans=3, img_size=None):
    """SPEC as the commands take it, or, with model flags, the network opened with them by the
    one resolver."""
    if mean is None and std is None and input_size is None and in_chans == 3 and img_size is None:
        return spec
    from .network import open_network

    return open_network(spec, weights, mean=mean, std=std, input_size=input_size, in_chans=in_chans,
                        image_size=img_size).module


probe_options = option_group(
    click.option("--probe", type=click.Path(), default=None,
                 help="Folder of probe images (any layout) for CKA, correlation and dataset examples "
                      "[default: the run's validation images]."),
    click.option("--probe-limit", type=int, default=256, show_default=True,
                 help="Use at most this many probe images (evenly spaced over the list)."),
    click.option("--image-size", type=int, default=None,
                 help="Size the probe images are resized to [default: the size the run trained at, else "
                      "the model's input size]."),
)


# ---------------------------------------------------------------- the group

def _pipe_safe(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(EXIT_BROKEN_PIPE)
    return wrapper


class Group(click.Group):
    """Click prints --help and --version itself, outside any command, and turns a closed pipe
    there into exit 1; parsing (make_context) and dispatch (invoke) end as quietly as a command."""

    make_context = _pipe_safe(click.Group.make_context)
    invoke = _pipe_safe(click.Group.invoke)


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
@_handle_errors
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
@_handle_errors
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
@_handle_errors
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


# ---------------------------------------------------------------- train

@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A TOML file of options (keys as the flags, with _ or -); flags given here override it.")
@click.option("--data", metavar="DIR", help="Training images: a folder with one sub-folder of images per class.")
@click.option("--val", metavar="DIR", help="A separate validation folder (same class folders) [default: split --data].")
@click.option("--val-fraction", type=float, help="Share of each class held out for validation by a seeded split "
              "that is the same on every run and resume  [default: 0.2].")
@click.option("--model", metavar="NAME|SNAPSHOT", help="Model name (googlenet, inception_v3, vgg16, squeezenet1_1, "
              "resnet50, timm/...) or a snapshot file to continue from  [default: googlenet].")
@click.option("--weights", metavar="WEIGHTS", help="Starting weights: " + WEIGHTS_HELP + "  [default: imagenet]")
@click.option("--epochs", type=int, help="Epochs to train; 0 only saves the original network  [default: 10]. "
              "With --resume: the new total.")
@click.option("--batch-size", type=int, help="[default: 32]")
@click.option("--cutoff", metavar="N|LAYER", help="Freeze the first N parameter-holding layers (forward order), or "
              "every layer up to and including LAYER (a name from `featureshift layers`)  [default: all layers "
              "train].")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd", "rmsprop"]), help="[default: adam]")
@click.option("--lr", type=float, help="Learning rate of the new classifier head, and of every layer with --weights "
              "random  [default: 0.001].")
@click.option("--pretrained-lr-scale", type=float, metavar="F", help="Layers that start from trained weights learn "
              "at F x --lr: fine-tuning every layer at the head's rate wrecks the pretrained features (1 trains "
              "all at --lr; --cutoff freezes layers)  [default: 0.1].")
@click.option("--weight-decay", type=float, help="[default: 0]")
@click.option("--momentum", type=float, help="For sgd and rmsprop  [default: 0.9].")
@click.option("--nesterov/--no-nesterov", default=None, help="Nesterov momentum for sgd  [default: off].")
@click.option("--schedule", type=click.Choice(["none", "cosine", "step"]),
              help="Learning-rate schedule: cosine decays to 0 over the epochs; step multiplies by --gamma every "
              "--step-size epochs  [default: none].")
@click.option("--step-size", type=int, help="Epochs between steps of the step schedule  [default: 10].")
@click.option("--gamma", type=float, help="Factor of the step schedule  [default: 0.1].")
@click.option("--snapshot-every", type=int, help="Save a snapshot every K epochs (and always before training and "
              "after the last epoch)  [default: 1].")
@click.option("--image-size", type=int, help="Input size in pixels  [default: the model's own].")
@click.option("--in-chans", type=int, help="Input bands of a model built from its name: 1 trains on grayscale "
              "images, 4 on RGBA (timm models)  [default: 3].")
@click.option("--img-size", type=int, help="The image size a vision transformer is built for (timm's img_size)  "
              "[default: the model's own].")
@click.option("--augment/--no-augment", default=None, help="Random crops and flips of training images (never of "
              "validation images)  [default: on].")
@click.option("--seed", type=int, help="Seed of the split, initialization and data order; the same seed gives the "
              "same metrics on CPU  [default: 0].")
@click.option("--out", metavar="DIR", help="Run folder to write  [default: runs/MODEL-DATA-TIME].")
@click.option("--resume", type=click.Path(file_okay=False), metavar="RUN", help="Continue the run in this folder "
              "from its last finished epoch (with --epochs N: extend it to N epochs).")
@click.option("--force", is_flag=True, default=None, help="Replace a run already in --out.")
@click.option("--device", metavar="DEVICE", callback=lambda c, p, v: None if v is None else _device_callback(c, p, v),
              help=f"{DEVICE_CHOICES}  [default: auto].")
@click.option("--workers", type=int, help="Image-decoding worker processes; 0 decodes in the main process  [default: "
              "with CUDA CPUs - 1, at most 8; on CPU 1, or 2 from 8 cores].")
@click.option("--nproc", type=int, metavar="N", help="Train in N processes on this machine, one per GPU "
              "(DistributedDataParallel; with --device cpu they share the cores). --batch-size is then the global "
              "batch, split among them. Several machines: torchrun (see the README)  [default: 1].")
@click.option("--amp/--no-amp", default=None, help="Mixed precision on CUDA  [default: on].")
@click.option("--channels-last/--no-channels-last", default=None, help="channels_last memory format on CUDA  "
              "[default: on].")
@click.option("--tensorboard", is_flag=True, default=None, help="Also write TensorBoard scalars to RUN/tensorboard "
              "(needs `pip install 'featureshift[tensorboard]'`).")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress bars or per-epoch lines (warnings "
              "and errors still go to stderr).")
@click.option("--visualize", multiple=True, metavar="LAYER", help="Render LAYER's first --columns channels on each "
              "snapshot as soon as it is written, into RUN/timeline/LAYER/merged.png (repeat for several layers).")
@click.option("--columns", type=int, default=5, show_default=True, help="Channels per row with --visualize.")
@click.option("--vis-steps", type=int, default=DEFAULT_SETTINGS.steps, show_default=True, callback=_steps_callback,
              help="Render steps with --visualize.")
@click.option("--vis-size", type=int, default=DEFAULT_SETTINGS.size, show_default=True,
              help="Render size with --visualize.")
@_handle_errors
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
@_handle_errors
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


# ---------------------------------------------------------------- vis

def _layers_from_stdin(stream) -> list[str]:
    """Layer names from piped text: the first tab-separated field of each line (the `layers` listing)."""
    if stream.isatty():
        raise FeatureshiftError("'-' reads layer names from standard input, but nothing is piped in. Example: "
                                "featureshift layers googlenet | grep inception4c | featureshift vis googlenet - -o out.png")
    names = []
    for line in stream.read().splitlines():
        name = line.split("\t")[0].strip()
        if name and not name.startswith("#") and line != "name\ttype\tchannels\tsize":
            names.append(name)
    if not names:
        raise FeatureshiftError("Standard input held no layer names ('-' reads one per line, the first tab-separated "
                                "field). Check the command before the pipe, e.g. `featureshift layers MODEL | grep NAME`.")
    return names


@main.command()
@click.argument("model_or_snapshot")
@click.argument("layers", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The grid image (.png). Each tile is also saved as OUTPUT_tiles/<layer>_<channel>.png.")
@channel_options(default=5)
@render_options(objective=True)
@device_option
@click.option("--labels/--no-labels", default=True, show_default=True,
              help="Label rows with the layer and columns with the channel.")
@click.option("--weights", default="imagenet", show_default=True,
              help="For a model name: " + WEIGHTS_HELP + " Ignored for a snapshot.")
@model_options
@ray_option
@quiet_option
@_handle_errors
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
        names += _layers_from_stdin(sys.stdin) if name == "-" else [name]
    model = model_argument(model_or_snapshot, weights, mean, std, input_size, in_chans, img_size)
    result = vis_api(model, list(dict.fromkeys(names)), output, columns=columns, channels=channels,
                     settings=settings_from(render), weights=weights, device=device, batch_size=batch_size,
                     labels=labels, quiet=quiet, ray=ray)
    for warning in result.warnings:
        _warn(warning)
    click.echo(result.summary())


# ---------------------------------------------------------------- timeline / merge

@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--layer", "layers", multiple=True, required=True,
              help="Layer to follow (repeat for several); `featureshift layers MODEL` lists them, "
                   "'logits' means the classes.")
@channel_options(default=5)
@click.option("--snapshots", default=None, help="Epochs to use, e.g. 0,1,5-10 [default: every snapshot].")
@click.option("--every", type=int, default=None, help="Use the snapshots whose epoch is a multiple of N.")
@render_options(objective=True)
@device_option
@click.option("--force", is_flag=True, help="Render again even what the cache holds.")
@click.option("--labels/--no-labels", default=True, help="Epoch, accuracy and channel labels, or a bare grid.")
@ray_option
@preprocessing_options
@quiet_option
@_handle_errors
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
    from .selection import DEFAULT_COLUMNS, check_exclusive

    check_exclusive(columns, channels)
    result = timeline_api(run, list(layers), channels if channels is not None else (columns or DEFAULT_COLUMNS),
                          snapshots=snapshots, every=every, settings=settings_from(render), device=device,
                          batch_size=batch_size, force=force, labels=labels, quiet=quiet, ray=ray, mean=mean,
                          std=std, input_size=input_size)
    click.echo(result.summary())
    if result.unreadable():
        raise FeatureshiftError(result.unreadable())


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The image to write (.png).")
@click.option("--labels", is_flag=True, help="Write each file's name to the left of its row.")
@click.option("--keep-order", is_flag=True, help="Stack in the order given instead of natural numeric order.")
@click.option("--title", default=None, help="A title above the stack.")
@quiet_option
@_handle_errors
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
@_handle_errors
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


# ---------------------------------------------------------------- atlas

@main.command()
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
@click.option("--force", is_flag=True, help="Render again even what the cache holds.")
@quiet_option
@_handle_errors
def atlas(run, layers, all_layers, snapshots, channels, device, batch_size, ray, dry_run, force, quiet, **render):
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
                       dry_run=dry_run, force=force, quiet=quiet)
    click.echo(result.summary())
    if result.unreadable():
        raise FeatureshiftError(result.unreadable())


# ---------------------------------------------------------------- compare / report

@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--layer", required=True, help="The layer to compare; `featureshift layers A` lists them.")
@channel_options(default=8, most_changed=True)
@click.option("--by", type=click.Choice(["weight", "correlation", "drift", "cross"]), default="weight",
              show_default=True,
              help="Measure to rank by: weight change, 1 - correlation (needs probe images), visual drift or "
                   "1 - cross-activation (these two render every channel of the layer).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The sheet to write (.png) [default: compare-LAYER.png].")
@click.option("--weights", default="imagenet", show_default=True, help="For A or B given as a model name. " + WEIGHTS_HELP)
@click.option("--rows", "table_rows", type=int, default=5, show_default=True,
              help="Channels listed as most and as least changed.")
@probe_options
@render_options(objective=False)
@device_option
@model_options
@ray_option
@quiet_option
@_handle_errors
def compare(a, b, layer, columns, channels, most_changed, by, output, weights, table_rows, probe, probe_limit,
            image_size, device, batch_size, mean, std, input_size, in_chans, img_size, ray, quiet, **render):
    """Compare LAYER of two networks A and B, channel by channel.

    A and B are snapshot files (e.g. RUN/snapshots/000.safetensors and RUN/snapshots/010.safetensors)
    or model names (with --weights), e.g. the ImageNet original against a fine-tuned snapshot. Writes
    a sheet with each channel's render at A above its render at B (same seed), labelled with its
    measures, and prints the most and least changed channels of the layer. CKA and correlation use
    --probe, or the validation images of the run that A or B belongs to. Measures: docs/metrics.md.

    \b
      featureshift compare runs/f/snapshots/000.safetensors runs/f/snapshots/050.safetensors \\
          --layer inception4c --most-changed 8 -o changed.png
    """
    from .commands.compare import compare as compare_api
    from .io import safe_name

    a, b = (model_argument(x, weights, mean, std, input_size, in_chans, img_size) for x in (a, b))
    result = compare_api(a, b, layer, columns=columns, channels=channels, most_changed=most_changed, by=by,
                         output=output or f"compare-{safe_name(layer)}.png", probe=probe, probe_limit=probe_limit,
                         image_size=image_size, weights=weights, settings=settings_from(render), device=device,
                         batch_size=batch_size, quiet=quiet, ray=ray)
    click.echo(result.table(table_rows))
    click.echo(f"sheet: {result.output}")


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--layer", "layers", multiple=True,
              help="Layer to render and rank channel by channel (repeat for several) [default: the layers the run "
                   "has timelines of, else one two thirds up the network].")
@channel_options(default=5)
@click.option("--examples", type=int, default=6, show_default=True, help="Dataset examples per channel and snapshot.")
@probe_options
@render_options(objective=False, inherit=True)
@device_option
@click.option("--accent/--no-accent", default=True, show_default=True,
              help="On the channel pages of the timelines' channels: the channel's top dataset example, "
                   "accentuated at every snapshot (a render per channel and snapshot, cached).")
@click.option("--open", "open_browser", is_flag=True, help="Open the report in the web browser.")
@ray_option
@quiet_option
@_handle_errors
def report(run, layers, columns, channels, examples, probe, probe_limit, image_size, device, batch_size, accent,
           open_browser, ray, quiet, **render):
    """Write the HTML report of the training run RUN to RUN/report/ and print its path.

    A static folder that opens from disk (no server, no network): configuration and dataset,
    training curves, weight change and CKA of every stage over the epochs, the timelines, a page
    per layer with its channels sortable by each measure, and a page per rendered channel with
    its render at every snapshot (a slider), its dataset examples before and after, and its
    measures over time. Renders come from the timeline cache (only missing ones are rendered),
    probe statistics from RUN/metrics/cache; the measures are also written to RUN/metrics/.

    \b
      featureshift report runs/flowers --layer inception4c --columns 8 --open
    """
    from .commands.report import build_report
    from .selection import check_exclusive

    check_exclusive(columns, channels)
    index = build_report(run, list(layers) or None, channels if channels is not None else columns, probe=probe,
                         probe_limit=probe_limit, image_size=image_size, examples=examples, device=device,
                         batch_size=batch_size, accent=accent, open_browser=open_browser, quiet=quiet, ray=ray,
                         **{k: v for k, v in render.items() if v is not None})
    click.echo(str(index))


@main.command("compare-runs")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the comparison to this file: JSON for a name ending in .json, else the table.")
@quiet_option
@_handle_errors
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


if __name__ == "__main__":
    main()
