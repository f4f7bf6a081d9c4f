"""Every family of network featureshift trains goes out as ONNX and comes back: the same logits,
layers listed as feature maps or tokens with their channels. Shallow random-weight networks at
small inputs (the architecture's code paths, not its depth, are what an export meets)."""
import dataclasses

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")
timm = pytest.importorskip("timm")

from featureshift.models.info import ModelInfo, attach_info, model_info  # noqa: E402
from featureshift.models.layers import list_layers  # noqa: E402
from featureshift.models.onnx.check import CHECK_TOLERANCE  # noqa: E402
from featureshift.models.onnx.export import save_onnx, to_onnx  # noqa: E402
from featureshift.network import open_network  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 5
# operators that only move values: an ONNX network lists none of them as a layer
MOVES = {"OnnxTranspose", "OnnxReshape", "OnnxFlatten", "OnnxSqueezeDynamicAxes", "OnnxSqueezeStaticAxes",
         "OnnxUnsqueezeStaticAxes", "OnnxUnsqueezeDynamicAxes", "OnnxSlice", "OnnxGather", "OnnxExpand"}


def _vit():
    """featureshift's own ViT, one block deep, at 112 px: a 7x7 patch grid and a class token. It
    takes any input size, resampling its position embeddings with antialiasing (opset 18)."""

    model = open_network("vit_tiny_patch16_224", weights="random", num_classes=CLASSES, image_size=112).module
    model.blocks = model.blocks[:1]
    return model


def _swin():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=CLASSES, img_size=32,
                              window_size=2, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1))
    return attach_info(model, ModelInfo("timm/swin_tiny_patch4_window7_224", CLASSES, list("abcde"), input_size=32))


def _convnext():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES, depths=(1, 1, 1, 1))
    return attach_info(model, ModelInfo("timm/convnext_atto", CLASSES, list("abcde"), input_size=32))


def _resnet():
    model = open_network("resnet18", weights="random", num_classes=CLASSES).module
    return attach_info(model, dataclasses.replace(model_info(model), input_size=32))


FAMILIES = {
    # family: (builder, a listed layer, its type of output, its channels, its shape)
    "vit": (_vit, "blocks.0.mlp.fc2.Add", "tokens", 192, "50 tokens (1+7x7)"),
    "swin": (_swin, "layers.1.downsample.reduction.MatMul", "NHWC", 48, "4x4"),
    "convnext": (_convnext, "stages.1.blocks.0.norm.LayerNormalization", "NHWC", 80, "4x4"),
    "torchvision-cnn": (_resnet, "layer2.0.Add", "NCHW", 128, "4x4"),
}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "swin" else f for f in FAMILIES])
@pytest.mark.slow
def test_each_family_round_trips_through_onnx(family, tmp_path):
    build, layer, layout, channels, shape = FAMILIES[family]
    torch.manual_seed(0)
    original = build().eval()
    info = model_info(original)
    path = save_onnx(to_onnx(original, info), tmp_path / f"{family}.onnx")  # the default opset
    loaded = open_network(path).module  # checked against onnxruntime while loading
    x = torch.randn(3, 3, info.input_size, info.input_size)
    with torch.no_grad():
        want, got = original(x), loaded(x)
    assert (got - want).abs().max() <= CHECK_TOLERANCE * max(1.0, want.abs().max())
    layers = {l.name: l for l in list_layers(loaded)}
    assert (layers[layer].layout, layers[layer].channels, layers[layer].shape) == (layout, channels, shape)
    assert not {l.type for l in layers.values()} & MOVES


@pytest.mark.slow
def test_vit_export_reads_back_with_the_cli(tmp_path):
    """The full vit_tiny_patch16_224, as a user exports it."""
    from click.testing import CliRunner

    from featureshift.cli import main

    runner = CliRunner()
    path = tmp_path / "v.onnx"
    exported = runner.invoke(main, ["export", "vit_tiny_patch16_224", "--weights", "random", "-o", str(path), "-q"])
    assert exported.exit_code == 0, exported.output
    listed = runner.invoke(main, ["layers", str(path), "-q"])
    assert listed.exit_code == 0, listed.output
    rows = [row.split("\t") for row in listed.stdout.splitlines()]
    assert rows[0] == ["patch_embed.proj.Conv", "Conv2d", "192", "14x14"]
    assert ["blocks.11.mlp.fc2.Add", "OnnxBinaryMathOperation", "192", "197 tokens (1+14x14)"] in rows


@pytest.mark.slow
def test_a_token_layer_of_an_onnx_vit_renders_at_another_size(tmp_path):
    """At a render's size the converted graph resamples its position embeddings (antialiased
    Resize, featureshift's converter) as the torch network does."""
    from featureshift.optvis.engine import render

    torch.manual_seed(0)
    original = _vit().eval()
    loaded = open_network(save_onnx(to_onnx(original, model_info(original)), tmp_path / "vit.onnx")).module
    x = torch.randn(2, 3, 64, 64)  # shrinks the 7x7 position embeddings to 4x4
    with torch.no_grad():
        assert (loaded(x) - original(x)).abs().max() < 1e-4
    result = render(loaded, [("blocks.0.mlp.fc2.Add", 0)], steps=2, size=64, quiet=True, device="cpu")
    assert result.images.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_vit_at_opset_17_is_exported_for_its_input_size(tmp_path):
    """Opset 17 cannot express the antialiased resampling, which at the input size does nothing."""
    import onnx

    torch.manual_seed(0)
    original = _vit().eval()
    info = model_info(original)
    model = to_onnx(original, info, opset=17)
    assert model.opset_import[0].version == 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 112, 112]
    loaded = open_network(save_onnx(model, tmp_path / "vit17.onnx")).module
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert (loaded(x) - original(x)).abs().max() < 1e-4
    assert not [n for n in onnx.load(str(tmp_path / "vit17.onnx")).graph.node if n.op_type == "Resize"
                and any(a.name == "antialias" for a in n.attribute)]
