"""Casting a memory-mapped model tensor by tensor gives the file's pages back without changing any value."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.file_pages import file_backed_ranges, replace_tensors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are released on Linux only")


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(512, 512)
        self.second = torch.nn.Linear(512, 512)
        self.register_buffer("scale", torch.ones(512))


def mapped_model(tmp_path: Path, tie: bool = False) -> tuple[Tied, dict[str, torch.Tensor]]:
    """A module whose weights are views of a safetensors file, as `from_pretrained` leaves them."""
    torch.manual_seed(0)
    expected = {key: value.clone() for key, value in Tied().state_dict().items()}
    save_file(expected, tmp_path / "model.safetensors")
    model = Tied()
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True)
    if tie:
        model.second.weight = model.first.weight
    return model, expected


def in_file_mapping(tensor: torch.Tensor) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in file_backed_ranges())


def test_a_cast_of_mapped_weights_releases_their_pages_and_keeps_every_value(tmp_path):
    model, expected = mapped_model(tmp_path)
    assert in_file_mapping(model.first.weight)  # (the premise: safetensors maps the file)
    model.second.weight.requires_grad_(False)
    kept_view = model.second.weight.data  # a reference held elsewhere reads the file back, not zeros

    def placed(tensor):
        if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad:
            return tensor.data.to(torch.bfloat16)
        return tensor.data

    released = replace_tensors(model, placed)

    weight_bytes = 512 * 512 * 4
    assert released >= weight_bytes - 4096  # the frozen weight, but for the pages it shares at its ends
    assert released < 2 * weight_bytes  # the trainable weight (kept as it is) was not released
    assert model.second.weight.dtype == torch.bfloat16 and not in_file_mapping(model.second.weight)
    torch.testing.assert_close(model.second.weight.float(), expected["second.weight"].bfloat16().float())
    assert model.first.weight.dtype == torch.float32 and in_file_mapping(model.first.weight)
    for key in ("first.weight", "first.bias", "second.bias", "scale"):
        torch.testing.assert_close(model.state_dict()[key], expected[key], rtol=0, atol=0)
    torch.testing.assert_close(kept_view, expected["second.weight"], rtol=0, atol=0)


def test_tied_and_anonymous_weights_are_never_released(tmp_path):
    model, expected = mapped_model(tmp_path, tie=True)
    assert replace_tensors(model, lambda tensor: tensor.data.to(torch.bfloat16)) < 512 * 4 * 4  # (biases, buffer)
    assert model.first.weight is model.second.weight
    torch.testing.assert_close(model.first.weight.float(), expected["first.weight"].bfloat16().float())

    torch.manual_seed(0)
    anonymous = Tied()  # weights in ordinary memory: releasing them would zero them
    kept_view = anonymous.first.weight.data
    original = kept_view.clone()
    assert replace_tensors(anonymous, lambda tensor: tensor.data.to(torch.bfloat16)) == 0
    torch.testing.assert_close(kept_view, original, rtol=0, atol=0)
