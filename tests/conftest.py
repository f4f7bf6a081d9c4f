import os

# Before torch loads (see featureshift/__init__.py): spinning OpenMP threads stall badly when the
# cores are shared with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

# Keep converted offline weights out of the user's cache during tests, but share them across tests.
os.environ.setdefault("FEATURESHIFT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".featureshift-cache"))


@pytest.fixture(scope="session")
def squeezenet():
    """The offline ImageNet SqueezeNet: real features for tests that need them."""
    import featureshift

    return featureshift.open_network("squeezenet1_1", weights="imagenet").module


@pytest.fixture(scope="session")
def photos():
    """Real photographs bundled with scikit-image: name -> PIL image."""
    from PIL import Image
    from skimage import data

    return {n: Image.fromarray(getattr(data, n)()) for n in ("chelsea", "coffee", "astronaut", "rocket")}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast and does not fight other processes for the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's handwritten digits as an ImageFolder (tests/_digits.py): real data for training tests."""
    from _digits import export_digits

    return export_digits(tmp_path_factory.mktemp("digits") / "digits")
