"""Feature spaces (Inception from a weights file, never a download) and guidance as a suite axis."""

import pytest
import torch

import bench
from bench.errors import BenchError
from bench.measure.features import INCEPTION_WEIGHTS_ENV, feature_space_for, inception
from bench.core.guidance import ClassifierFreeGuidance, ClassifierGuidance
from bench.sweep.runner import run_suite
from bench.sweep.store import read_results
from bench.sweep.suite import load_suite
from helpers import TINY_SUITE, write_suite


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception state dict, written the way the real weights file is (torch.save)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state_dict: None  # skip the weights it would download
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as module

        real_download = module.load_state_dict_from_url
        module.load_state_dict_from_url = lambda *args, **kwargs: None
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
        module.load_state_dict_from_url = real_download
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(extractor.state_dict(), path)
    return path


class ImageModel:
    shape = (3, 16, 16)
    sigma_min, sigma_max, sigma_data, num_classes = 0.002, 80.0, 0.5, None
    name = "images"

    def __call__(self, x, sigma, cond=None):
        return torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1) ** 2))


def test_inception_features_from_a_weights_file(inception_weights):
    space = feature_space_for(ImageModel(), str(inception_weights))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    features = space(images)
    assert space.name == "inception-v3-compat" and features.shape == (3, 2048) and features.dtype == torch.float64
    assert torch.equal(features, space(images))


def test_missing_inception_weights_name_the_option(monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(BenchError, match=r"feature_extractor_weights_path.*SAMPLERBENCH_INCEPTION_WEIGHTS"):
        feature_space_for(ImageModel())
    with pytest.raises(BenchError, match=r"does not exist"):
        inception("/nowhere/inception.pth")


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_weights_file_with_code_in_it_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(BenchError, match="not a plain state dict of tensors"):
        inception(str(path))


def test_classifier_guidance_is_classifier_free_guidance_one_scale_up(gmm_image):
    # sigma^2 grad log p(c | x) = D(x | c) - D(x) for the exact posterior (bench/core/guidance.py)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64) * 0.7
    sigma, labels = torch.full((6,), 0.9, dtype=torch.float64), torch.arange(6)
    with torch.inference_mode():
        classifier = ClassifierGuidance(gmm_image, 3.0)(x, sigma, labels)
        classifier_free = ClassifierFreeGuidance(gmm_image, 2.0)(x, sigma, labels)
    torch.testing.assert_close(classifier, classifier_free, rtol=1e-9, atol=1e-9)


class ConditionalModel(ImageModel):
    num_classes = 2


def test_classifier_guidance_needs_a_posterior():
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(BenchError, match="class_log_posterior"):
        bench.sample(ConditionalModel(), "euler", nfe=2, n=2, guidance=1.0, guidance_type="classifier", labels=labels)
    out = bench.sample(ConditionalModel(), "euler", nfe=2, n=2, guidance=1.0, labels=labels)
    assert out.model_evals == 4


def test_guidance_sweep_records_model_evaluations(tmp_path):
    text = 'guidance = [0.0, 1.0]\nlabels = "balanced"\n' + TINY_SUITE.replace("seeds = [0, 1]", "seeds = [0]")
    suite = load_suite(write_suite(tmp_path, text))
    run_suite(suite, tmp_path, progress=False)
    frame = read_results(tmp_path / "tiny.sqlite")
    assert (frame["status"] == "done").all()
    plain, guided = frame[frame["guidance"] == 0.0], frame[frame["guidance"] == 1.0]
    assert (plain["model_evals"] == plain["nfe"]).all()
    assert (guided["model_evals"] == 2 * guided["nfe"]).all()
    # classifier-free guidance trades diversity for fidelity: recall drops as w grows
    assert guided["recall"].mean() <= plain["recall"].mean() + 0.05
