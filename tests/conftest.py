import pytest
import torch

import bench


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)  # nothing in the harness uses the global RNG; this guards tests that do
    yield


@pytest.fixture(scope="session")
def gmm2d():
    return bench.load_model("gmm2d")


@pytest.fixture(scope="session")
def gmm_image():
    return bench.load_model("gmm-image")
