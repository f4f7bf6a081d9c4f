"""Fine-tuning the original tool's networks (googlenet, inception_v3, vgg16) at every size their
main path accepts, with tiny random-weight runs."""
import pytest
import torch

import featureshift
from featureshift import FeatureshiftError
from featureshift.commands.train import train
from featureshift.data import make_synthetic_dataset
from featureshift.run import list_snapshots, read_metrics, read_run, snapshot_path

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# The smallest input each network's main path accepts (16: the smallest --image-size there is).
SMALLEST = {"googlenet": 16, "inception_v3": 75, "vgg16": 32}
SQUEEZENET_SMALLEST = 17


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", classes=("stripes", "dots"),
                                  per_class=3, size=40)


def fit(data, out, **kw):
    opts = dict(data=str(data), weights="random", epochs=1, batch_size=2, val_fraction=0.34, workers=0,
                quiet=True, out=str(out))
    opts.update(kw)
    return train(**opts)


@pytest.mark.parametrize("model", sorted(SMALLEST))
@pytest.mark.slow
def test_trains_at_its_smallest_size_and_at_128(model, tiny, tmp_path):
    # vgg16's 100M-parameter classifier stays frozen but for its last layer: the size is what is tested here
    cutoff = "classifier.3" if model == "vgg16" else None
    for size in (SMALLEST[model], 128):
        run = fit(tiny, tmp_path / str(size), model=model, image_size=size, cutoff=cutoff)
        assert [e for e, _ in list_snapshots(run)] == [0, 1]
        assert read_metrics(run)[1]["train_images"] == 4
        info = read_run(run)
        assert info["status"] == "finished"
        if model == "inception_v3":
            aux = info["model"]["aux_logits"]
            assert aux["used"] is False and aux["weight"] == 0.4 and "at least 299 px" in aux["why"]
        else:
            assert "aux_logits" not in info["model"]
        opened = featureshift.open_network(snapshot_path(run, 1))
        net, meta = opened.module, opened.meta
        assert meta.info.input_size == size
        assert net(torch.zeros(1, 3, size, size)).shape == (1, 2)


@pytest.mark.slow
def test_inception_trains_its_auxiliary_classifier_where_it_fits(tiny, tmp_path):
    run = fit(tiny, tmp_path / "run", model="inception_v3", image_size=299, cutoff="Mixed_7a")
    aux = read_run(run)["model"]["aux_logits"]
    assert aux["used"] is True and aux["weight"] == 0.4 and aux["heads"] == ["AuxLogits"]
    net = featureshift.open_network(snapshot_path(run, 1)).module
    assert net.AuxLogits is not None and net.AuxLogits.fc.out_features == 2


@pytest.mark.slow  # test-fast stays under a minute: trains, spawns or builds a large network
def test_below_the_smallest_size_the_error_names_it(tiny, tmp_path):
    for model, size, smallest in (("inception_v3", 74, 75), ("squeezenet1_1", 16, 17)):
        with pytest.raises(FeatureshiftError, match=f"smallest size it accepts is {smallest} px"):
            fit(tiny, tmp_path / model, model=model, image_size=size)
        assert not (tmp_path / model).exists()


@pytest.mark.slow
def test_random_inception_v3_starts_at_the_loss_of_a_uniform_guess(tmp_path):
    # torchvision's own init gave a validation loss of 2.2e6 on digits before training (eval-mode
    # BatchNorm, still at its starting statistics, behind convs of std 0.1), 51 after one epoch.
    import math

    from _digits import export_digits

    data = export_digits(tmp_path / "digits", per_class=3)
    run = fit(data, tmp_path / "run", model="inception_v3", image_size=75, epochs=1, batch_size=8, val_fraction=0.2)
    before, after = read_metrics(run)
    assert before["val_loss"] == pytest.approx(math.log(10), abs=0.01)
    assert after["val_loss"] < 2 * math.log(10)
