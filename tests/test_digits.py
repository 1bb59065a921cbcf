"""The digits model and its feature network: verified loading, the shipped weights' quality, torch-fidelity's
code path for features, and the recipe that made them (a few steps of it)."""

import ast
import graphlib
import hashlib
import importlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import bench
from bench.adapters.checkpoints import load_checkpoint, pretrained_dir, read_manifest, sha256_hex
from bench.cli import EXIT_BAD_INPUT, main
from bench.measure.metrics import REFERENCE_DATA_SEED, MetricContext, SharedCache
from bench.measure.reference import ReferenceCache
from bench.sweep.provenance import _related_modules, defining_module
from bench.registry import manager
from plugins.digits.data import digits_split, draw_training_images, from_uint8, to_uint8, training_data_sha256
from plugins.digits.denoiser import SIGMA_DATA, load_digits_model
from plugins.digits.evaluate import fid
from plugins.digits.features import FEATURE_EXTRACTOR_NAME, DigitsFeatureExtractor
from plugins.digits.train import train_classifier, train_denoiser, train_recipe
from plugins.digits.weights import CLASSIFIER_NAME, MODEL_NAME, RECIPE

# of 200 conditional Heun samples at NFE 35 read as their label: the shipped model gives 0.995 to 1.0 over seeds 0-4
CLASS_ACCURACY_THRESHOLD = 0.95


ONE_THREAD = True  # conftest.py: small convolutions run many times slower on two shared threads


@pytest.fixture(scope="module")
def model():
    return bench.load_model("digits")


@pytest.fixture(scope="module")
def conditional_samples(model):
    labels = torch.arange(200) % 10
    return bench.sample(model, "heun", nfe=35, n=200, seed=0, schedule="karras", labels=labels)


def copy_shipped(directory, names=(MODEL_NAME, CLASSIFIER_NAME)):
    """The shipped checkpoints and a manifest of just them, copied into ``directory``."""
    manifest = read_manifest()
    for name in names:
        shutil.copy(pretrained_dir() / manifest[name]["file"], directory / manifest[name]["file"])
    (directory / "manifest.json").write_text(json.dumps({name: manifest[name] for name in names}))
    return manifest


def edit_manifest(directory, change):
    """Apply ``change`` to the entries of the manifest in ``directory``."""
    entries = json.loads((directory / "manifest.json").read_text())
    change(entries)
    (directory / "manifest.json").write_text(json.dumps(entries))


# ---------------------------------------------------------------------------------------------- checkpoints

def test_a_tampered_checkpoint_is_refused_naming_the_file_and_both_hashes(tmp_path):
    manifest = copy_shipped(tmp_path, names=(CLASSIFIER_NAME,))
    path = tmp_path / manifest[CLASSIFIER_NAME]["file"]
    assert load_checkpoint(CLASSIFIER_NAME, tmp_path).tensors  # the untouched copy loads
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(bench.BenchError) as error:
        load_checkpoint(CLASSIFIER_NAME, tmp_path)
    message = str(error.value)
    assert str(path) in message
    assert manifest[CLASSIFIER_NAME]["sha256"] in message  # expected, from the manifest
    assert sha256_hex(bytes(data)) in message  # actual
    assert RECIPE in message


def test_missing_checkpoints_name_what_to_run(tmp_path):
    with pytest.raises(bench.BenchError, match="samplerbench train digits"):  # no manifest at all
        load_digits_model(directory=tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(bench.BenchError, match="not in .*samplerbench train digits"):  # no entry
        load_digits_model(directory=tmp_path)
    copy_shipped(tmp_path)
    (tmp_path / read_manifest()[MODEL_NAME]["file"]).unlink()
    with pytest.raises(bench.BenchError, match="missing.*samplerbench train digits"):  # entry, but no file
        load_digits_model(directory=tmp_path)


def test_a_manifest_cannot_send_the_classifier_to_another_folder(tmp_path):
    """Issue 11: an entry "../other/digits-classifier.safetensors" once loaded the classifier from another folder,
    checked only against the manifest there, while the model reported the shipped classifier's hash."""
    (tmp_path / "store").mkdir()
    (tmp_path / "other").mkdir()
    copy_shipped(tmp_path / "store")
    copy_shipped(tmp_path / "other", names=(CLASSIFIER_NAME,))
    edit_manifest(tmp_path / "store",
                  lambda entries: entries[CLASSIFIER_NAME].update(file="../other/digits-classifier.safetensors"))
    with pytest.raises(bench.BenchError, match="'../other/digits-classifier.safetensors' is not a plain file name"):
        load_digits_model(directory=tmp_path / "store")


def test_the_model_reports_the_hashes_of_the_bytes_it_loaded(tmp_path):
    copy_shipped(tmp_path)
    shipped = load_digits_model(directory=tmp_path)
    # the same classifier tensors in a file of other bytes (other metadata), vouched for by the manifest
    tensors = load_checkpoint(CLASSIFIER_NAME, tmp_path).tensors
    copy = safetensors.torch.save(dict(tensors), metadata={"copied": "yes"})
    (tmp_path / "copy.safetensors").write_bytes(copy)
    edit_manifest(tmp_path, lambda entries: entries[CLASSIFIER_NAME].update(file="copy.safetensors",
                                                                           sha256=sha256_hex(copy)))
    model = load_digits_model(directory=tmp_path)
    assert model.checkpoint_sha256 == shipped.checkpoint_sha256 == read_manifest()[MODEL_NAME]["sha256"]
    assert model.classifier_sha256 == sha256_hex(copy) != shipped.classifier_sha256
    assert model.content_hash == hashlib.sha256(f"{model.checkpoint_sha256}:{sha256_hex(copy)}".encode()).hexdigest()
    assert model.content_hash != shipped.content_hash  # cached statistics of one are never served to the other


def test_a_checkpoint_of_another_network_is_refused_naming_its_tensors(tmp_path):
    copy_shipped(tmp_path)
    edit_manifest(tmp_path, lambda entries: entries.update({CLASSIFIER_NAME: entries[MODEL_NAME]}))
    with pytest.raises(bench.BenchError, match=r"digits.safetensors does not fit the network DigitsClassifier: "
                                               r"missing tensors 'body.0.bias', .*; unexpected tensors"):
        load_digits_model(directory=tmp_path)


def test_the_command_line_reports_a_hostile_manifest_without_a_traceback(tmp_path, capsys):
    copy_shipped(tmp_path)
    edit_manifest(tmp_path, lambda entries: entries[MODEL_NAME].update(file="/etc/hostname"))
    assert main(["train", "digits", "--evaluate", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith("samplerbench: error: checkpoint 'digits' in ") and "not a plain file name" in error
    assert "Traceback" not in error


def test_the_manifest_records_how_each_checkpoint_was_made():
    manifest = read_manifest()
    for name in (MODEL_NAME, CLASSIFIER_NAME):
        entry = manifest[name]
        assert entry["recipe"] == RECIPE and "--seed" in entry["arguments"]
        assert entry["data_sha256"] == training_data_sha256()
        assert entry["training"]["loss"] > 0 and entry["training"]["seconds"] > 0 and entry["training"]["device"]
        size = (pretrained_dir() / entry["file"]).stat().st_size
        assert size < 5_000_000
    assert manifest[CLASSIFIER_NAME]["evaluation"]["held_out_accuracy"] >= 0.97
    evaluation = manifest[MODEL_NAME]["evaluation"]
    assert {"fid_conditional_samples_vs_train_n297", "fid_held_out_vs_train_n297",
            "fid_unconditional_samples_vs_train_n297", "fid_held_out_vs_any_train_n297",
            "class_accuracy_guidance_0", "class_accuracy_guidance_4"} <= set(evaluation)
    assert evaluation["class_accuracy_guidance_0"] >= CLASS_ACCURACY_THRESHOLD


# ---------------------------------------------------------------------------------------------------- data

def test_the_split_is_fixed_and_sigma_data_is_the_training_std():
    split = digits_split()
    assert split.train_images.shape == (1500, 1, 8, 8) and split.held_out_images.shape == (297, 1, 8, 8)
    assert split.train_images.min() == -1 and split.train_images.max() == 1
    # no image index is in both parts: the split is a permutation
    assert len(torch.cat([split.train_labels, split.held_out_labels])) == 1797
    assert SIGMA_DATA == pytest.approx(split.train_images.std().item(), abs=5e-4)


def test_sample_data_draws_training_images_by_seed_and_label(model):
    first, again = model.sample_data(300, seed=3), model.sample_data(300, seed=3)
    assert torch.equal(first, again) and first.shape == (300, 1, 8, 8) and first.dtype == torch.float32
    assert not torch.equal(first, model.sample_data(300, seed=4))
    everything = model.sample_data(1500, seed=0)  # n <= 1,500: every training image once
    assert len(everything.flatten(1).unique(dim=0)) == len(digits_split().train_images.flatten(1).unique(dim=0))
    assert model.sample_data(2000, seed=0).shape == (2000, 1, 8, 8)  # more than there are: with replacement
    labels = torch.tensor([3, 3, -1, 7] * 50)
    drawn = draw_training_images(200, seed=0, labels=labels)
    split = digits_split()
    label_of = {tuple(image.flatten().tolist()): int(label) for image, label in zip(split.train_images, split.train_labels)}
    assert all(label_of[tuple(image.flatten().tolist())] == int(label)
               for image, label in zip(drawn, labels) if label >= 0)


def test_real_pixels_survive_the_uint8_quantisation_exactly():
    images = digits_split().train_images
    pixels = to_uint8(images)
    assert pixels.dtype == torch.uint8 and pixels.min() == 0 and pixels.max() == 255
    assert torch.equal(from_uint8(pixels), images)
    # samples are read at the data's 17 grey levels: anything within half a level of a level lands on it
    assert torch.equal(from_uint8(to_uint8(images + 0.06)), images)


# ------------------------------------------------------------------------------------------ feature network

def test_the_classifier_is_accurate_on_the_held_out_digits(model):
    images, labels = model.held_out_data()
    accuracy = (model.classify(images).argmax(1) == labels).double().mean().item()
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(read_manifest()[CLASSIFIER_NAME]["evaluation"]["held_out_accuracy"])


def test_features_come_through_torch_fidelitys_registered_extractor(model):
    assert FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] is DigitsFeatureExtractor
    assert isinstance(model.extractor, DigitsFeatureExtractor)
    x = model.sample_data(64, seed=0) + 0.02 * torch.randn(64, 1, 8, 8)
    features = model.features(x)
    assert features.shape == (64, 64) and features.dtype == torch.float32
    with torch.no_grad():  # the penultimate layer, run directly on the quantised input
        direct = model.extractor.classifier.features(from_uint8(to_uint8(x)))
        logits = model.extractor.classifier.head(direct)
    assert torch.equal(features, direct)
    assert torch.equal(model.classify(x), logits)


def test_torch_fidelity_calculate_metrics_gives_the_fid_the_model_features_give(model):
    """The full torch-fidelity pipeline, datasets of uint8 images in, agrees with features + its FID functions."""
    real, held_out = model.sample_data(297, seed=REFERENCE_DATA_SEED), model.held_out_data()[0]

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.pixels = to_uint8(x)

        def __len__(self):
            return len(self.pixels)

        def __getitem__(self, i):
            return self.pixels[i]

    metrics = torch_fidelity.calculate_metrics(
        input1=Images(held_out), input2=Images(real), fid=True, kid=True, kid_subset_size=100, cuda=False,
        feature_extractor=FEATURE_EXTRACTOR_NAME, cache=False, verbose=False,
        save_cpu_ram=True)  # no DataLoader worker processes
    assert metrics["kernel_inception_distance_mean"] < 1
    ours = fid(model.features(held_out), model.features(real))
    assert metrics["frechet_inception_distance"] == pytest.approx(ours, rel=1e-6)
    recorded = read_manifest()[CLASSIFIER_NAME]["evaluation"]["fid_held_out_vs_train_n297"]
    assert ours == pytest.approx(recorded, rel=1e-4)


# ------------------------------------------------------------------------------------------------- the model

def test_the_shipped_model_loads_verified_and_samples_with_labels(model, conditional_samples):
    assert model.name == "digits" and model.shape == (1, 8, 8) and model.num_classes == 10
    assert (model.sigma_min, model.sigma_max) == (0.002, 80.0)
    manifest = read_manifest()
    assert model.checkpoint_sha256 == manifest[MODEL_NAME]["sha256"]
    assert model.classifier_sha256 == manifest[CLASSIFIER_NAME]["sha256"]
    x = conditional_samples.x
    assert conditional_samples.nfe == 35 and x.shape == (200, 1, 8, 8)
    assert torch.isfinite(x).all() and x.abs().max() <= 1.5


def test_conditional_samples_are_read_as_their_label(model, conditional_samples):
    predicted = model.classify(conditional_samples.x).argmax(1)
    accuracy = (predicted == conditional_samples.labels).double().mean().item()
    assert accuracy >= CLASS_ACCURACY_THRESHOLD


def test_label_minus_one_is_the_unconditional_model(model):
    x = model.sample_data(8, seed=0) + 0.5 * torch.randn(8, 1, 8, 8)
    sigma = torch.full((8,), 0.5)
    unconditional = model(x, sigma, torch.full((8,), -1))
    assert torch.equal(unconditional, model(x, sigma, None))
    assert not torch.allclose(unconditional, model(x, sigma, torch.full((8,), 3)))
    guided = bench.sample(model, "heun", nfe=9, n=16, labels=torch.arange(16) % 10, guidance=1.0)
    assert guided.model_evals == 2 * guided.nfe and torch.isfinite(guided.x).all()
    with pytest.raises(ValueError, match="out of range"):
        model(x, sigma, torch.full((8,), 10))


def test_float64_input_gives_float64_output(model):
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    assert model(x, torch.full((4,), 2.0, dtype=torch.float64)).dtype == torch.float64


def metric_context(model, samples, labels):
    return MetricContext(model=model, model_id="digits", samples=samples, x_T=samples, labels=labels, seed=0,
                         stochastic=False, references=ReferenceCache(), shared=SharedCache())


def test_class_accuracy_metric(model, conditional_samples):
    compute = manager().get("metric", "class_accuracy").obj.compute
    samples, labels = conditional_samples.x, conditional_samples.labels
    expected = (model.classify(samples).argmax(1) == labels).double().mean().item()
    assert compute(metric_context(model, samples, labels)) == pytest.approx(expected)
    assert compute(metric_context(model, samples, None)) is None
    assert compute(metric_context(bench.load_model("gmm2d"), torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))) \
        is None  # a model without a classifier
    real, real_labels = model.held_out_data()
    assert compute(metric_context(model, real, real_labels)) >= 0.97


def test_fid_of_real_digits_is_small_in_the_digits_feature_space(model):
    compute = manager().get("metric", "fid").obj.compute
    held_out = model.held_out_data()[0]
    noise = torch.rand(297, 1, 8, 8) * 2 - 1
    assert compute(metric_context(model, held_out, None)) < compute(metric_context(model, noise, None)) / 10


# ------------------------------------------------------------------------------------------------ the recipe

def test_training_is_deterministic_given_the_seed():
    first, _ = train_denoiser(steps=2, seed=5, batch_size=16, log_every=0)
    second, _ = train_denoiser(steps=2, seed=5, batch_size=16, log_every=0)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    classifier, record = train_classifier(steps=2, seed=5, batch_size=16, log_every=0)
    again, _ = train_classifier(steps=2, seed=5, batch_size=16, log_every=0)
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), again.state_dict().values()))
    assert record["steps"] == 2 and record["loss"] > 0


@pytest.mark.slow
def test_the_recipe_trains_evaluates_and_saves_loadable_checkpoints(tmp_path):
    train_recipe(["--steps", "3", "--classifier-steps", "3", "--batch-size", "16", "--out", str(tmp_path)])
    manifest = read_manifest(tmp_path)
    assert set(manifest) == {MODEL_NAME, CLASSIFIER_NAME}
    assert manifest[MODEL_NAME]["arguments"][:2] == ["--seed", "0"]
    model = load_digits_model(directory=tmp_path)
    assert model.checkpoint_sha256 == manifest[MODEL_NAME]["sha256"]


# ----------------------------------------------------------------------------------------------- the package

def test_the_package_reaches_outside_only_into_bench_has_no_cycle_and_small_modules():
    package = Path(load_digits_model.__code__.co_filename).parent
    imports_within = {}
    for path in sorted(package.glob("*.py")):
        source = path.read_text()
        assert source.count("\n") <= 400, f"{path.name} has grown past 400 lines: split it"
        imports_within[path.stem] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert node.level == 1, f"{path.name} imports from outside the package: {ast.unparse(node)}"
                imports_within[path.stem] |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m.split(".")[0] == "plugins" for m in modules), \
                    f"{path.name}: a plugin imports bench, never another plugin ({ast.unparse(node)})"
    imports_within.pop("__init__")  # the hook implementations import the rest
    list(graphlib.TopologicalSorter(imports_within).static_order())  # raises CycleError on an import cycle


def test_a_rows_code_hash_covers_the_modules_that_shape_the_model():
    """The harness keys a row by the source of the module that defines the model loader and of the modules it
    takes names from (bench.sweep.provenance): after the split they must still include the networks, the data
    and the feature space, or an edit to them would leave stale rows in place."""
    module = importlib.import_module(defining_module(load_digits_model))
    covered = {related.__name__ for related in _related_modules(module)}
    assert {f"plugins.digits.{name}" for name in ("data", "networks", "features", "denoiser")} <= covered
