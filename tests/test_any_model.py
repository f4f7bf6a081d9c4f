"""Networks beyond torchvision's RGB CNNs: vision transformers (token layers) and inputs that
are not 3-channel RGB, built with timm at tiny sizes and random weights."""
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("timm")

from featureshift.cli import main  # noqa: E402
from featureshift.commands.compare import compare  # noqa: E402
from featureshift.training.cutoff import plan_cutoff  # noqa: E402
from featureshift.commands.vis import vis  # noqa: E402
from featureshift.data import ImageDataset, eval_transform, open_image  # noqa: E402
from featureshift.jobs.cache import read_tile_about  # noqa: E402
from featureshift.models.info import ModelInfo  # noqa: E402
from featureshift.models.layers import Capture, list_layers, truncated  # noqa: E402
from featureshift.network import open_network  # noqa: E402
from featureshift.optvis.engine import render  # noqa: E402
from featureshift.snapshot import save_snapshot  # noqa: E402

SIZE = 48  # timm's test_vit (patch 16, width 64, 6 blocks) sees a 3x3 patch grid and a class token
FAST = dict(steps=4, size=SIZE, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def vit(one_thread):
    with torch.random.fork_rng():  # the same random ViT whichever tests ran before
        torch.manual_seed(0)
        return open_network("timm/test_vit", weights="random", num_classes=3, image_size=SIZE).module


@pytest.fixture(scope="module")
def vit_states(vit, tmp_path_factory):
    """Two snapshots of the ViT: as built, and with the later blocks moved."""
    root = tmp_path_factory.mktemp("vit")
    a = root / "a.safetensors"
    save_snapshot(vit, a, epoch=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # moved, not replaced: a tenth of each tensor's own spread
        for name, p in vit.named_parameters():
            if name.startswith(("blocks.1.", "blocks.2.")) and p.numel() > 1:
                p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    b = root / "b.safetensors"
    save_snapshot(vit, b, epoch=1)
    vit.load_state_dict(open_network(a).module.state_dict())
    return a, b


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory):
    """A tiny two-class dataset of 8-bit grayscale images: bright bars and dark dots."""
    root = tmp_path_factory.mktemp("gray")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("bars", "dots")):
        (root / name).mkdir()
        for i in range(6):
            a = rng.integers(0, 60, (40, 40))
            if c == 0:
                a[:, ::6] = 230
            else:
                a[::8, ::8] = 255
            Image.fromarray(a.astype(np.uint8), "L").save(root / name / f"{i}.png")
    return root


def test_timm_model_uses_its_own_configuration_and_records_build_options(vit):
    import timm

    info = vit.featureshift_info
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_vit", pretrained=False))
    assert info.arch == "timm/test_vit" and info.img_size == SIZE and info.input_size == SIZE
    assert info.mean == tuple(cfg["mean"]) and info.std == tuple(cfg["std"])
    assert info.interpolation == cfg["interpolation"] == "bicubic"
    resize = eval_transform(info).transforms[0]
    assert resize.interpolation.value == "bicubic"
    # snapshots written before these fields load as RGB networks of the architecture's own size
    old = ModelInfo.from_dict({"arch": "resnet18", "num_classes": 2, "class_names": ["a", "b"]})
    assert (old.in_chans, old.img_size, old.interpolation) == (3, None, "bilinear")


def test_vit_layers_are_token_outputs_with_their_width(vit, vit_states):
    layers = {l.name: l for l in list_layers(vit)}
    block = layers["blocks.1"]
    assert (block.layout, block.channels, block.tokens, block.prefix) == ("tokens", 64, 10, 1)
    assert (block.height, block.width) == (3, 3)  # the patch grid
    assert block.row() == "blocks.1\tBlock\t64\t10 tokens (1+3x3)"
    assert layers["blocks.1.mlp.fc1"].channels == 192
    # the CLI lists them from a snapshot, rebuilt at the size it was built for
    out = CliRunner().invoke(main, ["layers", str(vit_states[0])])
    assert out.exit_code == 0, out.output
    assert "blocks.5\tBlock\t64\t10 tokens (1+3x3)" in out.output


def test_token_layers_are_seen_as_patch_grids(vit):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), Capture(vit, ["blocks.1"]) as raw:
        tokens = raw(x)["blocks.1"]
    with torch.no_grad(), truncated(vit, ["blocks.1"]) as grid:
        patches = grid(x)["blocks.1"]
    with torch.no_grad(), truncated(vit, ["blocks.1"], include_prefix=True) as every:
        everything = every(x)["blocks.1"]
    assert tokens.shape == (2, 10, 64) and patches.shape == (2, 64, 3, 3) and everything.shape == (2, 64, 10, 1)
    assert torch.allclose(patches.flatten(2).mean(2), tokens[:, 1:].mean(1), atol=1e-6)


def test_channel_objective_on_a_block_is_the_patch_token_mean_unless_the_class_token_is_included(vit):
    patch_only = render(vit, [("blocks.1", 3)], **{**FAST, "steps": 0})
    with_cls = render(vit, [("blocks.1", 3)], **{**FAST, "steps": 0}, include_cls=True)
    start = torch.as_tensor(patch_only.images).permute(0, 3, 1, 2)  # the same starting image for both
    info = vit.featureshift_info
    x = (start - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad(), Capture(vit, ["blocks.1"]) as net:
        tokens = net(x)["blocks.1"][0, :, 3]
    assert patch_only.scores[0] == pytest.approx(float(tokens[1:].mean()), abs=1e-4)
    assert with_cls.scores[0] == pytest.approx(float(tokens.mean()), abs=1e-4)
    assert patch_only.scores[0] != pytest.approx(with_cls.scores[0], abs=1e-6)
    assert with_cls.settings["include_cls"] is True and "include_cls" not in patch_only.settings


def test_vis_renders_a_vit_block(vit, tmp_path):
    result = vis(vit, "blocks.1", tmp_path / "vit.png", columns=2, **FAST)
    assert not result.failed and not result.no_response
    for path in result.tiles.values():
        a = np.asarray(Image.open(path), np.float32)
        assert a.std() > 8  # a picture, not the flat starting noise (about 1 grey level)


@pytest.mark.slow  # test-fast stays under a minute; a cheaper test covers the same path
def test_compare_and_metrics_on_two_vit_states(vit_states, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)).save(probe / f"{i}.png")
    a, b = vit_states
    result = compare(a, b, "blocks.2", columns=2, probe=probe, steps=3, size=SIZE, device="cpu", quiet=True)
    assert len(result.rows) == 64 and result.weight_change > 0
    assert result.cka is not None and 0 < result.cka <= 1.0 + 1e-6, result.cka
    row = result.rows[0]
    assert math.isfinite(row["correlation"]) and math.isfinite(row["weight_change"])
    assert all(math.isfinite(r["drift"]) for r in result.rows[:2])


def test_cutoff_by_block_name_freezes_the_blocks_up_to_it(vit):
    plan = plan_cutoff(vit, "blocks.1", SIZE)
    frozen = set(plan.frozen)
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.mlp.fc2", "blocks.1.norm2"} <= frozen
    assert not any(n.startswith(("blocks.2", "blocks.5", "norm", "head")) for n in frozen)


def test_grayscale_network_trains_on_gray_images_and_renders_gray(gray_folder, tmp_path, one_thread):
    from featureshift.commands.train import train

    model = open_network("timm/test_resnet", weights="random", num_classes=2, in_chans=1).module
    info = model.featureshift_info
    assert info.in_chans == 1 and len(info.mean) == len(info.std) == 1
    x, _ = ImageDataset([(next(gray_folder.glob("bars/*.png")), 0)], eval_transform(info, 32), channels=1)[0]
    assert x.shape == (1, 32, 32)
    start = tmp_path / "start.safetensors"
    save_snapshot(model, start)
    run = train(data=str(gray_folder), model=str(start), epochs=1, batch_size=4, image_size=32, workers=0,
                device="cpu", out=str(tmp_path / "run"), quiet=True, augment=False)
    opened = open_network(sorted((run / "snapshots").glob("*.safetensors"))[-1])
    trained, meta = opened.module, opened.meta
    assert meta.info.in_chans == 1 and meta.epoch == 1
    result = render(trained, [("layer1", 0)], steps=3, size=32, device="cpu", quiet=True)
    assert result.images.shape == (1, 32, 32, 1)
    out = vis(trained, "layer1", tmp_path / "gray.png", columns=1, steps=3, size=32, device="cpu", quiet=True)
    tile = np.asarray(Image.open(out.tiles[("layer1", 0, 0)]).convert("RGB"), np.int16)
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all() and tile.std() > 0
    assert read_tile_about(out.tiles[("layer1", 0, 0)])["shown"].startswith("grayscale")


def test_four_band_network_renders_its_first_three_bands_as_rgb(tmp_path, one_thread):
    from featureshift.grid import to_pil

    model = open_network("timm/test_resnet", weights="random", num_classes=2, in_chans=4).module
    assert len(model.featureshift_info.mean) == 4
    result = render(model, [("layer1", 1)], steps=3, size=32, device="cpu", quiet=True)
    assert result.images.shape == (1, 32, 32, 4)
    shown = np.asarray(to_pil(result.images[0]), np.float32) / 255
    assert np.abs(shown - result.images[0][..., :3]).max() < 1 / 255 + 1e-6
    out = vis(model, "layer1", tmp_path / "bands.png", channels=[1], steps=3, size=32, device="cpu", quiet=True)
    assert read_tile_about(out.tiles[("layer1", 1, 0)])["shown"] == "bands 1-3 of 4 shown as RGB"
    # an RGBA image is read as four bands, its alpha the fourth
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 77
    Image.fromarray(rgba, "RGBA").save(tmp_path / "four.png")
    assert np.asarray(open_image(tmp_path / "four.png", channels=4))[..., 3].max() == 77


def test_open_network_builds_a_timm_vit_at_a_small_size():
    net = open_network("timm/test_vit", "random", image_size=32)
    assert net.info.img_size == 32 and net.module(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


@pytest.mark.slow  # test-fast stays under a minute: trains, spawns or builds a large network
def test_vit_trains_with_a_block_cutoff_and_its_timeline_renders(vit, tmp_path):
    from featureshift.commands.timeline import timeline
    from featureshift.commands.train import train

    rng = np.random.default_rng(2)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / "data" / c / f"{i}.png")
    start = tmp_path / "start.safetensors"
    save_snapshot(vit, start)
    run = train(data=str(tmp_path / "data"), model=str(start), epochs=1, batch_size=4, workers=0, device="cpu",
                out=str(tmp_path / "run"), quiet=True, cutoff="blocks.1", lr=1e-2)
    a, b = (open_network(run / "snapshots" / f"00{e}.safetensors").module.state_dict() for e in (0, 1))
    assert torch.equal(a["blocks.1.mlp.fc2.weight"], b["blocks.1.mlp.fc2.weight"])
    assert torch.equal(a["patch_embed.proj.weight"], b["patch_embed.proj.weight"])
    assert not torch.equal(a["blocks.2.mlp.fc2.weight"], b["blocks.2.mlp.fc2.weight"])
    result = timeline(run, "blocks.2", [0], steps=2, size=SIZE, device="cpu", quiet=True)
    assert result.epochs == [0, 1] and not result.failed and result.merged["blocks.2"].exists()


def test_swin_stages_are_listed_as_channel_first_maps(one_thread):
    import timm

    from featureshift.models.info import attach_info

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=2)
    attach_info(swin.eval(), ModelInfo("timm/swin_tiny_patch4_window7_224", 2, ["a", "b"], input_size=32))
    layers = {l.name: l for l in list_layers(swin)}
    assert (layers["patch_embed.proj"].layout, layers["patch_embed.proj"].channels) == ("NCHW", 16)
    stage = layers["layers.1"]
    assert (stage.layout, stage.channels, stage.height, stage.width) == ("NHWC", 32, 4, 4)
    with torch.no_grad(), truncated(swin, ["layers.1"]) as net:
        assert net(torch.zeros(2, 3, 32, 32))["layers.1"].shape == (2, 32, 4, 4)
