"""The command line's shared pieces: errors as one paragraph, the options several commands take,
and the options generated from a settings record's fields (TrainConfig, RenderSettings), so that
each default and its help are written once, on the field.

Like cli.py it imports nothing heavy: `--help` and argument errors answer without torch.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any

import click

from .device import DEVICE_CHOICES, check_device_spec
from .errors import FeatureshiftError
from .flags import FLAG, default_words, flagged_fields
from .io import WRITE_ERRNOS, write_error
from .optvis.settings import DEFAULT_SETTINGS, RenderSettings

# A writer killed by SIGPIPE exits 128 + 13 in every shell; coreutils do the same.
EXIT_BROKEN_PIPE = 141
# RenderSettings fields that only commands rendering an objective of their own take
OBJECTIVE_FIELDS = ("objective", "diversity", "diversity_weight")


def quiet_stdout() -> None:
    """After the reader of our output went away: send the rest nowhere, so Python's own
    flush at exit does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def handle_errors(fn):
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
            quiet_stdout()
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


def warn(text: str) -> None:
    click.echo(f"featureshift: warning: {text}", err=True)


def device_callback(ctx, param, value):
    if value is None:  # not given, where the default comes from elsewhere (train: a TOML file, the run)
        return None
    try:
        return check_device_spec(value)
    except FeatureshiftError as e:
        raise click.BadParameter(str(e)) from None


def steps_callback(ctx, param, value):
    # The API renders 0 steps on purpose (the starting noise, to compare a render with); from the
    # command line it only writes tiles that were never optimized, under the name of a render.
    if value is not None and value < 1:
        raise click.BadParameter(f"{value} steps would write the starting noise as the picture, never "
                                 f"optimized; give 1 or more (the default: {DEFAULT_SETTINGS.steps}).")
    return value


def device_option(fn):
    return click.option("--device", default="auto", show_default=True, callback=device_callback,
                        help=f"Where to run: {DEVICE_CHOICES} (auto: a CUDA GPU, else MPS, else the CPU).")(fn)


def ray_option(fn):
    return click.option(
        "--ray", default=None, metavar="auto|ADDRESS",
        help="Render on Ray: 'auto' starts an instance on this machine (its GPUs and CPUs), HOST:PORT joins a "
             "running cluster (`ray start --head`), 'local' renders here  [default: $FEATURESHIFT_RAY_ADDRESS, "
             "else here]. Needs pip install 'featureshift[ray]'.")(fn)


def force_option(fn):
    return click.option("--force", is_flag=True, help="Render again even what the cache holds.")(fn)


def floor_option(fn):
    return click.option(
        "--floor/--no-floor", default=True, show_default=True,
        help="Render a sample of each layer's channels (up to 32) a second time at the first snapshot, another "
             "seed, for the render-noise floors: a channel is called changed only beyond what render noise alone "
             "gives (docs/metrics.md, \"Noise floors\"). --no-floor saves those renders.")(fn)


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


def field_options(cls, *, skip=(), inherit: str | None = None, extra: dict[str, dict[str, Any]] | None = None):
    """Options for the fields of the dataclass CLS that carry a flag (flags.flag), in their order,
    but those in SKIP. Each defaults to None, "not given", so that a value replaces the field only
    where given (over a TOML file, a resumed run, a run's timeline); its help names the field's
    default, after INHERIT where the command takes the value from elsewhere first. EXTRA: more
    click keywords per field name (a callback)."""
    opts = []
    for f in flagged_fields(cls):
        if f.name in skip:
            continue
        spec = f.metadata[FLAG]
        name = "--" + f.name.replace("_", "-")
        decls = [spec.short] if spec.short else []
        kw: dict[str, Any] = dict(default=None, metavar=spec.metavar, help=spec.help, **(extra or {}).get(f.name, {}))
        words = default_words(f)
        if words is not None and not spec.switch:
            kw["help"] += f"  [default: {inherit + ', else ' if inherit else ''}{words}]"
        if spec.switch:
            kw["is_flag"] = True
        elif isinstance(f.default, bool):
            name += f"/--no-{f.name.replace('_', '-')}"
        elif spec.choices:
            kw["type"] = click.Choice(spec.choices)
        elif spec.path:
            kw["type"] = click.Path(dir_okay=spec.path != "file", file_okay=spec.path != "folder")
        else:
            kw["type"] = spec.type or (type(f.default) if f.default is not None else str)
        opts.append(click.option(*decls, name, f.name, **kw))
    return option_group(*opts)


def render_options(objective: bool, inherit: bool = False):
    """The options of RenderSettings (those of the objective only where OBJECTIVE), and --batch-size.
    With inherit=True they say they default to the run's timeline of the layer (the report)."""
    fields = field_options(RenderSettings, skip=() if objective else OBJECTIVE_FIELDS,
                           inherit="as the run's timeline" if inherit else None,
                           extra={"steps": {"callback": steps_callback}})
    batch = click.option("--batch-size", type=int, default=None,
                         help="Images optimized at once  [default: as many as memory allows].")
    return option_group(fields, batch)


def settings_from(options: dict):
    """RenderSettings from the render options a command received (None: keep the default)."""
    return DEFAULT_SETTINGS.replace(**{f.name: options.pop(f.name) for f in flagged_fields(RenderSettings)
                                       if f.name in options})


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


def pipe_safe(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except BrokenPipeError:
            quiet_stdout()
            sys.exit(EXIT_BROKEN_PIPE)
    return wrapper


def layers_from_stdin(stream) -> list[str]:
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
