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


@pytest.fixture(scope="module", autouse=True)
def _one_thread_where_asked(request):
    """Torch on one thread for the parity modules and for modules that set ONE_THREAD = True. The tiny UNet's
    convolutions and the analytic models' small matrix products gain nothing from a second thread, and on a shared
    machine two torch threads spin-wait on each other: 15x slower convolutions, gmm-image at 1.4 ms per call on one
    thread and 50 ms on two under load (tests/peers.py, one_thread)."""
    if not (request.module.__name__.endswith("_parity") or getattr(request.module, "ONE_THREAD", False)):
        yield
        return
    from peers import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def unet():
    """The parity tests' tiny randomly initialised diffusers UNet2DModel (tests/peers.py)."""
    from peers import tiny_unet

    return tiny_unet()


@pytest.fixture(scope="module")
def model(unet):
    """The tiny UNet as a samplerbench Denoiser, on DDPM's training grid; modules with another `model` override it."""
    from diffusers import DDPMScheduler
    from peers import tiny_scheduler_config

    return bench.from_diffusers(unet, DDPMScheduler(**tiny_scheduler_config()))
