"""What a run leaves beside the model (finetune/outputs.py): the loss curve's smoothing, labelled sample grids, the
model card's metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from finetune.outputs import grid_image, smooth_by_steps, write_loss_curve


def test_smoothing_starts_at_the_first_value_and_follows_a_known_series():
    # a constant: the bias-corrected average is that constant from the first point (no climb from 0 or lag)
    assert smooth_by_steps([25, 50, 75], [0.5, 0.5, 0.5], span=100) == pytest.approx([0.5, 0.5, 0.5])

    # a step from 1 to 0 at step 100: after k more steps the average is the share of weight left on the old value,
    # beta^k of the total, the same whether the loss was logged every step or every 10 steps
    span = 20
    beta = 1 - 1 / span
    every_step = smooth_by_steps(list(range(1, 201)), [1.0] * 100 + [0.0] * 100, span)
    every_10 = smooth_by_steps(list(range(10, 201, 10)), [1.0] * 10 + [0.0] * 10, span)
    assert every_step[9::10] == pytest.approx(every_10)
    for k in (10, 50, 100):
        expected = beta**k * (1 - beta**100) / (1 - beta ** (100 + k))  # weight of steps 1-100 over all weight
        assert every_step[99 + k] == pytest.approx(expected)

    # the curve: a loss falling as exp(-step/150) + 0.04, logged every 25 steps for 700 steps. The old
    # per-point average (0.9 per point, starting at the first loss) ended more than 2x above the loss; this one ends
    # within 15% of it and never above the first loss
    steps = list(range(25, 701, 25))
    losses = [float(np.exp(-s / 150) + 0.04) for s in steps]
    smoothed = smooth_by_steps(steps, losses, span=35)
    assert smoothed[0] == pytest.approx(losses[0]) and max(smoothed) <= losses[0]
    assert smoothed[-1] == pytest.approx(losses[-1], rel=0.15)
    old, running = [], losses[0]
    for value in losses:
        running = 0.9 * running + 0.1 * value
        old.append(running)
    assert old[-1] > 2 * losses[-1]


def test_the_loss_curve_is_written(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(5, 105, 5)))
    path = write_loss_curve(log, tmp_path / "loss_curve.png")
    assert path is not None and Image.open(path).format == "PNG"


def test_labelled_grids_put_each_prompt_under_its_row():
    images = [Image.new("L", (16, 16), 40 * i) for i in range(6)]
    labels = ["a", "b", "c"] * 2  # as a run's sample(): image i has prompt i % 3
    grid = grid_image(images, labels)
    # 16 px enlarged x4 to 64; 3 rows (one per label) of 2, each with an 18 px caption strip
    assert grid.mode == "L" and grid.size == (2 * 64 + 3 * 2, 2 + 3 * (64 + 2 + 18))
    pixels = np.asarray(grid)
    row_top = [2 + r * (64 + 2 + 18) for r in range(3)]
    for r, top in enumerate(row_top):
        assert pixels[top + 10, 2 + 10] == 40 * r and pixels[top + 10, 2 + 64 + 2 + 10] == 40 * (r + 3)
        strip = pixels[top + 64 + 2 : top + 64 + 2 + 18]
        assert (strip < 100).any() and (strip == 255).mean() > 0.7  # dark text on white
    # no labels (unconditional): the plain square-ish grid, still enlarged
    assert grid_image(images).size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    # a long prompt is cut to the grid's width; a label with more images than 8 wraps
    wide = grid_image([Image.new("RGB", (64, 64))] * 10, ["a very long prompt " * 20] * 10)
    assert wide.size == (8 * 66 + 2, 2 + 2 * 66 + 18)


# the Hub's licence identifiers (https://huggingface.co/docs/hub/repositories-licenses) and image-generation tasks
# that difftune's cards may name
HUB_LICENSES = {
    "apache-2.0",
    "mit",
    "openrail",
    "openrail++",
    "creativeml-openrail-m",
    "bigscience-openrail-m",
    "cc-by-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "other",
}
HUB_IMAGE_TASKS = {"text-to-image", "image-to-image", "unconditional-image-generation"}


def assert_valid_card(path) -> dict:
    """The checks the Hub's card validation makes that can be made offline: the metadata parses (huggingface_hub's
    ModelCard / ModelCardData), the licence is a Hub identifier ("other" with a name and a link), pipeline_tag a Hub
    task, base_model a repo id, no empty value, the widget's image exists. Returns the metadata."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert str(card).startswith("---\n") and meta["library_name"] == "diffusers"
    assert meta["license"] in HUB_LICENSES, meta["license"]
    if meta["license"] == "other":
        assert meta.get("license_name") and meta.get("license_link", "").startswith("https://"), meta
    if "pipeline_tag" in meta:
        assert meta["pipeline_tag"] in HUB_IMAGE_TASKS, meta["pipeline_tag"]
    if "base_model" in meta:
        validate_repo_id(meta["base_model"])
    assert all(isinstance(tag, str) and tag for tag in meta["tags"])
    assert all(value is not None and value != "" for value in meta.values()), meta
    for item in meta.get("widget", []):
        assert (path.parent / item["output"]["url"]).is_file()
    assert "| None |" not in card.text and "https://github.com/)" not in card.text
    assert "OUTPUT_DIR_OR_REPO_ID" not in card.text
    return meta
