"""Metrics of finetune.evaluate and the digits classifier behind them.

The classifier trains once per test session (seconds) into a temporary cache folder named by $DIFFTUNE_CACHE.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import digits_classifier as dc
from finetune import evaluate as ev
from finetune.digits import load_digits_tensors
from tests.tiny_models import make_tiny_unet2d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("difftune_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(dc.CACHE_ENV_VAR, str(directory))
        yield directory


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return dc.load_digits_classifier()


@pytest.fixture(scope="module")
def evaluator(classifier):
    # a 500-image reference keeps each KID computation well under a second
    return ev.DigitsEvaluator(16, num_real=500, kid_subsets=10)


def _with_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(-1, 1)


# ---- the classifier -------------------------------------------------------------------------------------------------


def test_classifier_reads_held_out_digits_at_every_resolution(classifier):
    assert classifier.training_info["test_accuracy"] >= 0.97
    for resolution in (8, 16, 32):
        assert dc.classifier_accuracy(classifier, resolution, "test") >= 0.97, resolution
    rgb = load_digits_tensors(16, "test")[0][:50].expand(-1, 3, -1, -1)
    assert torch.equal(classifier.predict(rgb), classifier.predict(rgb[:, :1]))


def test_cache_hit_loads_the_same_weights_without_training(classifier, cache_dir, monkeypatch):
    path = dc.classifier_cache_path()
    assert path.parent == cache_dir and path.is_file() and path.with_suffix(".json").is_file()
    assert not list(cache_dir.glob("*.tmp")), "temporary files must be renamed into place"

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(dc, "train_digits_classifier", must_not_train)
    reloaded = dc.load_digits_classifier()
    for name, tensor in classifier.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert reloaded.training_info == json.loads(path.with_suffix(".json").read_text())


def test_changed_recipe_or_corrupt_file_is_retrained(classifier, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    trained = []

    def fake_train(seed=0, recipe=None):
        trained.append(recipe)
        return classifier

    monkeypatch.setattr(dc, "train_digits_classifier", fake_train)
    path = dc.classifier_cache_path(tmp_path)
    info = dict(classifier.training_info, recipe=dict(classifier.training_info["recipe"], epochs=1))
    save_file(load_file(str(dc.classifier_cache_path())), str(path), metadata={"training_info": json.dumps(info)})
    dc.load_digits_classifier(tmp_path)
    assert len(trained) == 1, "a cache file from another recipe must not be used"

    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable digits classifier cache"):
        dc.load_digits_classifier(tmp_path)
    assert len(trained) == 2
    dc.load_digits_classifier(tmp_path)
    assert len(trained) == 2, "the rebuilt file should now be a cache hit"
    assert dc.classifier_cache_path(seed=1) != dc.classifier_cache_path(seed=0)


# ---- Fréchet distance and KID ---------------------------------------------------------------------------------------


def test_identical_sets_score_zero_and_noise_raises_both_metrics(evaluator):
    reference = evaluator.reference_images
    identical = evaluator.score(reference)
    scores = [evaluator.score(_with_noise(reference, sigma)) for sigma in (0.1, 0.3, 1.0)]
    assert abs(identical["fd"]) < 1e-6
    # the unbiased KID of a set with itself is slightly negative (its diagonal is left out): ~0 next to real noise
    assert abs(identical["kid_mean"]) < 0.05 and abs(identical["kid_mean"]) < scores[-1]["kid_mean"] / 10
    fds = [identical["fd"]] + [s["fd"] for s in scores]
    kids = [identical["kid_mean"]] + [s["kid_mean"] for s in scores]
    assert fds == sorted(fds) and len(set(fds)) == 4, fds
    assert kids == sorted(kids) and len(set(kids)) == 4, kids
    assert scores[-1]["fd"] > 5 and scores[-1]["kid_mean"] > 0.2


def test_real_vs_real_baseline_is_small_next_to_noise(evaluator):
    baseline = evaluator.baseline()
    assert baseline is not evaluator.baseline() and baseline == evaluator.baseline()  # cached, handed out as copies
    assert baseline["num_samples"] == len(load_digits_tensors(16, "test")[0])
    assert baseline["class_accuracy"] >= 0.97 and baseline["confident_fraction"] > 0.9
    pure_noise = torch.rand(400, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = evaluator.score(pure_noise)
    heavy = evaluator.score(_with_noise(evaluator.reference_images, 1.0))
    assert 0 < baseline["fd"] < heavy["fd"] / 10 and baseline["fd"] < noise["fd"] / 50
    assert abs(baseline["kid_mean"]) < heavy["kid_mean"] / 10
    assert noise["confident_fraction"] < baseline["confident_fraction"]


def test_class_accuracy_follows_the_requested_labels(evaluator):
    images, labels = load_digits_tensors(16, "test")
    true = evaluator.score(images, labels)
    shuffled = evaluator.score(images, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))])
    assert true["class_accuracy"] >= 0.97
    assert 0.03 < shuffled["class_accuracy"] < 0.2
    assert sum(true["predicted_class_histogram"]) == len(images)
    assert "class_accuracy" not in evaluator.score(images)
    with pytest.raises(ValueError, match="class labels"):
        evaluator.score(images, labels[:5])


def test_non_finite_samples_give_nan_instead_of_crashing(evaluator):
    broken = torch.full((8, 1, 16, 16), float("nan"))
    scores = evaluator.score(broken)
    assert math.isnan(scores["fd"]) and math.isnan(scores["kid_mean"])


# ---- pipelines and folders ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline_folder(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = make_tiny_unet2d(resolution=16)
    folder = tmp_path_factory.mktemp("tiny_ddpm")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def test_evaluate_pipeline_folder_scores_a_saved_ddpm_pipeline(classifier, tiny_pipeline_folder, capsys):
    result = ev.evaluate_pipeline_folder(tiny_pipeline_folder, num_samples=12, steps=3, batch_size=8, seed=0)
    samples, baseline = result["digits"]["samples"], result["digits"]["baseline"]
    assert samples["num_samples"] == 12 and result["settings"]["pipeline_class"] == "DDPMPipeline"
    assert baseline["num_samples"] == 12, "the baseline uses as many held-out images as there are samples"
    for key in ("fd", "kid_mean", "kid_std", "confident_fraction"):
        assert math.isfinite(samples[key]) and math.isfinite(baseline[key]), key
    assert samples["fd"] > baseline["fd"], "random UNet weights cannot look like digits"
    assert "class_accuracy" not in samples and result["settings"]["class_conditional"] is False
    report = capsys.readouterr().out
    assert "real-vs-real baseline" in report and "Fréchet distance" in report
    assert "KID (Binkowski et al. 2018) is unbiased" in report


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone(tiny_pipeline_folder):
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(tiny_pipeline_folder)
    state = torch.random.get_rng_state()
    first, labels = ev.sample_pipeline_images(pipeline, 5, steps=2, batch_size=3, seed=7)
    second, _ = ev.sample_pipeline_images(pipeline, 5, steps=2, batch_size=3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert labels is None and first.shape == (5, 1, 16, 16) and torch.equal(first, second)
    assert first.min() >= -1 and first.max() <= 1
    with pytest.raises(ValueError, match="takes no class_labels"):
        ev.sample_pipeline_images(pipeline, 2, steps=2, class_labels=[0, 1])


class _DigitsLookupPipeline:
    """A class-conditional stand-in: returns a real digit of each requested class (or of a wrong one)."""

    def __init__(self, wrong_class: bool = False):
        self.images, self.labels = load_digits_tensors(16, "test")
        self.wrong_class = wrong_class

    def __call__(self, class_labels, num_inference_steps=50, generator=None, output_type="np"):
        picks = []
        for label in class_labels:
            label = (label + 1) % 10 if self.wrong_class else label
            candidates = torch.nonzero(self.labels == label).flatten()
            picks.append(candidates[torch.randint(len(candidates), (1,), generator=generator)].item())
        images = (self.images[picks].permute(0, 2, 3, 1).numpy() + 1) / 2  # NHWC in [0, 1], like diffusers "np"
        return type("Output", (), {"images": images})()


def test_class_conditional_pipelines_get_labels_and_are_judged_on_them(evaluator):
    right = ev.evaluate_pipeline(_DigitsLookupPipeline(), num_samples=40, batch_size=16, digits_evaluator=evaluator)
    wrong = ev.evaluate_pipeline(
        _DigitsLookupPipeline(True), num_samples=40, batch_size=16, digits_evaluator=evaluator
    )
    assert right["settings"]["class_conditional"] is True
    histogram = right["digits"]["samples"]["predicted_class_histogram"]
    assert sum(histogram) == 40 and max(histogram) <= 6, histogram  # labels 0..9 were asked for in turn
    assert right["digits"]["samples"]["class_accuracy"] >= 0.95
    assert wrong["digits"]["samples"]["class_accuracy"] <= 0.1
    logs = ev.metrics_for_logging(right)
    assert logs["eval/digits_fd"] == right["digits"]["samples"]["fd"]
    assert logs["eval/digits_fd_baseline"] == right["digits"]["baseline"]["fd"]
    assert all(isinstance(value, float) for value in logs.values())


def test_saved_class_conditional_pipeline_is_found_in_the_pipelines_package(classifier, tmp_path):
    class_conditional = pytest.importorskip("pipelines.class_conditional")
    from diffusers import DDIMScheduler

    unet = make_tiny_unet2d(resolution=8, num_class_embeds=10)
    class_conditional.ClassConditionalDDPMPipeline(
        unet=unet, scheduler=DDIMScheduler(), num_classes=10
    ).save_pretrained(tmp_path)
    result = ev.evaluate_pipeline_folder(tmp_path, num_samples=10, steps=2, batch_size=4, print_report=False)
    assert result["settings"]["pipeline_class"] == "ClassConditionalDDPMPipeline"
    assert result["settings"]["class_conditional"] is True
    assert 0 <= result["digits"]["samples"]["class_accuracy"] <= 1
    assert "8 px" in result["digits"]["baseline_is"]


def _write_pngs(folder: Path, images: torch.Tensor) -> None:
    folder.mkdir()
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for index, image in enumerate(pixels):
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")


def test_cli_compares_two_image_folders_and_writes_json(classifier, tmp_path):
    real, fake = load_digits_tensors(16, "train")[0][:600], load_digits_tensors(16, "test")[0]
    _write_pngs(tmp_path / "real", real)
    _write_pngs(tmp_path / "fake", _with_noise(fake, 1.0))
    out = tmp_path / "scores.json"
    args = ["--real-dir", str(tmp_path / "real"), "--fake-dir", str(tmp_path / "fake"), "--json", str(out)]
    assert ev.main(args) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["num_real"] == 600 and result["settings"]["num_samples"] == len(fake)
    assert result["digits"]["samples"]["fd"] > 3 * result["digits"]["baseline"]["fd"]
    loaded = ev.load_image_folder(tmp_path / "real")
    assert loaded.shape == (600, 1, 16, 16) and (loaded - real).abs().max() < 1 / 127


def test_cli_names_the_bad_path(tmp_path, capsys):
    missing = tmp_path / "no-such-pipeline"
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(missing)])
    assert exit_info.value.code == 2 and str(missing) in capsys.readouterr().err
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    assert ev.main([str(not_a_pipeline)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    # too few samples for FD to mean much: said before any work (here the folder is refused next)
    assert ev.main([str(not_a_pipeline), "--num-samples", "64"]) == 2
    err = capsys.readouterr().err
    assert "warning: --num-samples 64: FD on fewer than about 500 images is biased" in err


# ---- Inception ------------------------------------------------------------------------------------------------------


def test_inception_without_weights_says_where_to_get_them(tmp_path, tiny_pipeline_folder, capsys):
    missing = tmp_path / ev.FID_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases") as error:
        ev.InceptionEvaluator(missing)
    assert str(missing) in str(error.value)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ev.evaluate_pipeline_folder(tiny_pipeline_folder, num_samples=4, inception_weights=missing)
    with pytest.raises(SystemExit):
        ev.main([str(tiny_pipeline_folder), "--inception-weights", str(missing)])
    assert "inception_v3_google" in capsys.readouterr().err


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_inception_weights_are_never_unpickled_as_code(tmp_path):
    marker = tmp_path / "code-ran"
    weights = tmp_path / "weights.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCodeWhenUnpickled(marker)}, weights)
    with pytest.raises(ValueError, match="weights_only"):
        ev.load_inception_features(weights)
    assert not marker.exists()


def test_inception_features_from_local_weights_in_either_format(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = ev.InceptionV3Features().state_dict()
    fid_path = tmp_path / "fid.safetensors"
    save_file({**state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, str(fid_path))
    torchvision_path = tmp_path / "inception_v3_google.pth"
    torch.save(
        {**state, "fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.weight": torch.zeros(1000, 768)},
        torchvision_path,
    )
    network = ev.load_inception_features(fid_path)
    assert network.fid_variant
    assert not ev.load_inception_features(torchvision_path).fid_variant
    truncated = tmp_path / "truncated.safetensors"
    save_file({key: value for key, value in state.items() if not key.startswith("Mixed_7c")}, str(truncated))
    with pytest.raises(ValueError, match="not an Inception-v3 state dict"):
        ev.load_inception_features(truncated)

    assert torch.equal(network.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    features = network(load_digits_tensors(16, "test")[0][:2])
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


class _PooledPixels(torch.nn.Module):
    """Stands in for Inception below: FD on 2048-d features costs ~15 CPU-seconds per computation on 2 cores."""

    def forward(self, images):
        gray = images.mean(dim=1, keepdim=True)
        pooled = torch.nn.functional.adaptive_avg_pool2d(gray, 2).flatten(1)
        return torch.cat([pooled, gray.std(dim=(1, 2, 3))[:, None], gray.abs().mean(dim=(1, 2, 3))[:, None]], 1)


def test_inception_evaluator_scores_against_digits_or_given_real_images(monkeypatch, tmp_path):
    from finetune.evaluation import inception as inception_module  # where InceptionEvaluator looks it up

    monkeypatch.setattr(inception_module, "load_inception_features", lambda path: _PooledPixels())
    inception = ev.InceptionEvaluator(tmp_path / "weights.pth", num_real=200, kid_subsets=5)
    assert len(inception.reference_images) == 200 and "held-out test split" in inception.reference_description
    baseline = inception.baseline()
    assert baseline["num_samples"] == 200 and baseline == inception.baseline()
    noisy = inception.score(_with_noise(load_digits_tensors(16, "test")[0], 1.0))
    assert noisy["fd"] > 10 * baseline["fd"] and noisy["kid_mean"] > abs(baseline["kid_mean"])

    real = load_digits_tensors(16, "train")[0][:100].expand(-1, 3, -1, -1)
    halves = ev.InceptionEvaluator(tmp_path / "weights.pth", real_images=real, kid_subsets=5)
    assert len(halves.reference_images) == 50 and halves.baseline()["num_samples"] == 50


def test_torchmetrics_fid_matches_the_closed_form_for_gaussians():
    """Independent check of the FD plumbing: two Gaussians with known means and covariances."""
    rng = np.random.default_rng(0)
    dim, count = 4, 20000
    scale = np.array([1.0, 2.0, 0.5, 1.5])
    real = torch.from_numpy(rng.standard_normal((count, dim)))
    fake = torch.from_numpy(rng.standard_normal((count, dim)) * scale + 0.5)
    # FD of N(0, I) and N(m, diag(s^2)): |m|^2 + sum (1 - s)^2
    expected = dim * 0.25 + float(((1 - scale) ** 2).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = ev.FeatureDistance(real, kid_subsets=2, kid_subset_size=500)(fake)["fd"]
    assert measured == pytest.approx(expected, abs=0.05)
