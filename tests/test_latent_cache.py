"""The sharded disk caches (finetune/latent_cache.py), latents and text: shards planned before encoding, 2 processes
write what 1 writes, and a changed setting rebuilds exactly the cache it affects. (A kill mid-cache that resumes, for
each cache: in tests/test_front_door_checkpoints.py; sharded = memory = uncached losses: tests/test_lora.py; a real
2-process run on the disk caches: tests/test_multiprocess.py; DreamBooth's prompts: tests/test_dreambooth.py.)"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune import latent_cache as lc
from tests.helpers import assert_same_tensors, reset_accelerate
from tests.tiny_models import make_test_images


def test_shards_are_bounded_by_bytes_and_by_count():
    shards = lc.plan_shards([10] * 7 + [25, 10], shard_bytes=30, max_examples=2)
    assert [s.indices for s in shards] == [(0, 1), (2, 3), (4, 5), (6,), (7,), (8,)]
    assert [s.number for s in shards] == list(range(6))
    assert [s.indices for s in lc.plan_shards([50, 50], shard_bytes=10)] == [(0,), (1,)], "one example at least"


def fake_encoder(calls: list[int]):
    """Moments that are a function of the example (as the VAE's are), in batches of 3, logging what it encodes."""

    def encode(indices):
        for start in range(0, len(indices), 3):
            batch = indices[start : start + 3]
            calls.extend(batch)
            values = torch.stack([torch.full((2, 2, 2), float(i)) + torch.arange(8.0).view(2, 2, 2) for i in batch])
            yield [(10 + i, False) for i in batch], values, len(batch)

    return encode


def test_two_processes_write_the_shards_one_process_writes_and_each_reads_the_union(tmp_path):
    shards = lc.plan_shards([100] * 11, shard_bytes=400)  # 3 shards: 4, 4, 3 examples
    one_calls, two_calls = [], []
    lc.write_shards(tmp_path / "one", shards, "fp", fake_encoder(one_calls), torch.bfloat16, progress=False)
    for rank in (1, 0):  # (in either order: a shard is whoever's, not whenever's)
        lc.write_shards(
            tmp_path / "two", shards, "fp", fake_encoder(two_calls), torch.bfloat16, rank, 2, progress=False
        )
    assert sorted(one_calls) == sorted(two_calls) == list(range(11)), "every example encoded once"
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        assert lc.shard_metadata(tmp_path / "one" / name) == lc.shard_metadata(tmp_path / "two" / name)
        assert_same_tensors(load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name), atol=0)
    reader = lc.ShardedMoments(tmp_path / "two", shards)
    assert len(reader) == 11 and reader[(15, False)].dtype == torch.bfloat16  # stored in the dtype asked for
    assert torch.equal(reader[(15, False)].float(), torch.full((2, 2, 2), 5.0) + torch.arange(8.0).view(2, 2, 2))
    assert len(reader.handles) == 1 and all(reader[(10 + i, False)] is not None for i in range(11))
    assert len(reader.handles) <= lc.OPEN_SHARDS

    # finished shards are kept: a second pass encodes nothing; a shard of other settings is encoded again
    done = lc.write_shards(tmp_path / "two", shards, "fp", fake_encoder(two_calls), torch.bfloat16, progress=False)
    assert done["reused"] == 3 and done["encoded"] == 0
    save_file({"m/0/0": torch.zeros(1)}, str(tmp_path / "two" / names[1]), metadata={"fingerprint": "other"})
    calls = []
    lc.write_shards(tmp_path / "two", shards, "fp", fake_encoder(calls), torch.bfloat16, progress=False)
    assert calls == [4, 5, 6, 7]


def fake_text_encoder(calls: list[int]):
    """Conditioning that is a function of the caption's position, two named tensors each, in batches of 2."""

    def encode(positions):
        for start in range(0, len(positions), 2):
            batch = positions[start : start + 2]
            calls.extend(batch)
            named = {}
            for p in batch:
                named[lc.text_key(p, "prompt_embeds")] = torch.full((3, 4), float(p))
                named[lc.text_key(p, "pooled_prompt_embeds")] = torch.full((4,), -float(p))
            yield named, len(batch)

    return encode


def test_text_shards_two_processes_write_what_one_writes_read_lazily_and_resume(tmp_path):
    texts = sorted({"", *(f"caption {i}" for i in range(9))})
    shards = lc.plan_shards([48 + 16] * len(texts), shard_bytes=4 * 64)  # 3 shards: 4, 4, 2 captions
    one_calls, two_calls = [], []
    lc.write_tensor_shards(tmp_path / "one", shards, "fp", fake_text_encoder(one_calls), progress=False)
    for rank in (1, 0):
        lc.write_tensor_shards(tmp_path / "two", shards, "fp", fake_text_encoder(two_calls), rank, 2, progress=False)
    assert sorted(one_calls) == sorted(two_calls) == list(range(10)), "every caption encoded once"
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 3 and sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        assert lc.shard_metadata(tmp_path / "one" / name) == lc.shard_metadata(tmp_path / "two" / name)
        assert_same_tensors(load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name), atol=0)

    reader = lc.ShardedTexts(tmp_path / "two", shards, texts)
    assert not reader.handles, "nothing is opened before a lookup"
    position = texts.index("caption 5")
    conditioning = reader["caption 5"]
    assert sorted(conditioning) == ["pooled_prompt_embeds", "prompt_embeds"]
    assert torch.equal(conditioning["prompt_embeds"], torch.full((3, 4), float(position)))
    assert torch.equal(conditioning["pooled_prompt_embeds"], torch.full((4,), -float(position)))
    assert len(reader.handles) == 1 and "" in reader and "never seen" not in reader and len(reader) == 10
    reader["a validation prompt"] = {"prompt_embeds": torch.ones(3, 4)}  # (kept in memory beside the shards)
    assert "a validation prompt" in reader and len(reader) == 11 and set(reader) == {*texts, "a validation prompt"}
    assert all(reader[t]["prompt_embeds"].shape == (3, 4) for t in texts) and len(reader.handles) <= lc.OPEN_SHARDS

    # a run killed after its first shard: the next one encodes the other two only
    (tmp_path / "two" / names[1]).unlink()
    (tmp_path / "two" / names[2]).unlink()
    kept = (tmp_path / "two" / names[0]).stat()
    calls = []
    done = lc.write_tensor_shards(tmp_path / "two", shards, "fp", fake_text_encoder(calls), progress=False)
    assert done["reused"] == 1 and sorted(calls) == list(range(4, 10))
    again = (tmp_path / "two" / names[0]).stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)


def test_a_fast_process_shard_is_not_counted_as_reused_by_a_slow_one(tmp_path):
    """Two processes as threads: rank 1 is quick, rank 0 looks at the disk half a second later (as a busy main process
    does). Each waits at the barrier after its look, so rank 0 reports all 5 captions encoded, none reused (CI once
    lacked 'encoding 5 captions': rank 1's shard had landed before rank 0 looked)."""
    shards = lc.plan_shards([64] * 5, shard_bytes=3 * 64)  # 2 shards: rank 0 writes 3 captions, rank 1 writes 2
    barrier, results = threading.Barrier(2, timeout=30), {}

    def process(rank, delay):
        time.sleep(delay)
        results[rank] = lc.write_tensor_shards(
            tmp_path, shards, "fp", fake_text_encoder([]), rank, 2, progress=False, barrier=barrier.wait
        )

    threads = [threading.Thread(target=process, args=(rank, 0.5 * (rank == 0))) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0]["reused"] == results[1]["reused"] == 0
    assert results[0]["images"] == results[1]["images"] == 5 and results[0]["encoded"] + results[1]["encoded"] == 5


def lora_method(base, data, output_dir, **changes):
    from accelerate import Accelerator

    from finetune.methods import get_method_class
    from finetune.recipe import load_config

    recipe = {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"dataset": str(data), "resolution": 64, "random_flip": False},
        "train": {"output_dir": str(output_dir), "progress_bar": False},
        "lora": {"rank": 2, "cache": "disk", "cache_dir": str(output_dir / "cache"), "validation_prompts": []},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        recipe[section][name] = value
    reset_accelerate()
    method = get_method_class("lora")(load_config(recipe), Accelerator(cpu=True))
    method.setup()
    return method


def test_a_changed_setting_rebuilds_exactly_the_cache_it_affects(tiny_sd_dir, tmp_path, caplog):
    base, data, out = tmp_path / "base", tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_sd_dir, base)  # (its VAE is changed below)
    for i, path in enumerate(make_test_images(data, 2, size=64)):
        path.with_suffix(".txt").write_text(f"a toy {i}")
    caplog.set_level(logging.INFO)
    seen: dict[str, set[str]] = {}

    def cache_after(name: str, **changes) -> tuple[str, str]:
        """Run the caching of a run with `changes`; return (what it encoded, what it reused) as 'latents'/'text'."""
        caplog.clear()
        lc_before = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()} if out.exists() else {}
        lora_method(base, data, out, **changes).before_training(None)
        latents = "encoding 0 images" not in caplog.text
        text = "encoding 0 captions" not in caplog.text
        after = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
        assert all(after[n] == t for n, t in lc_before.items()), "caches of other settings are left as they are"
        seen[name] = set(after)
        return ("latents" if latents else "") + ("+text" if text else "")

    assert cache_after("base") == "latents+text"
    assert cache_after("same") == "", "the same settings reuse both"
    assert cache_after("resolution", data__resolution=32) == "latents"
    assert cache_after("flip", data__random_flip=True) == "latents"
    assert cache_after("pixel limit", data__max_image_pixels=10**6) == "latents"
    vae_file = next((base / "vae").glob("*.safetensors"))
    weights = load_file(vae_file)
    name = next(k for k in weights if k.endswith("conv_in.weight"))
    weights[name] = weights[name] * 1.01  # the same path, other weights
    save_file(weights, str(vae_file))
    assert cache_after("vae") == "latents"
    (data / "image_000.txt").write_text("a new caption")
    assert cache_after("caption") == "+text", "captions change the text cache only"
    encoder_file = next((base / "text_encoder").glob("*.safetensors"))
    weights = load_file(encoder_file)
    name = next(k for k in weights if k.endswith("token_embedding.weight"))
    weights[name] = weights[name] * 1.01  # the same path and config, other weights
    save_file(weights, str(encoder_file))
    assert cache_after("text encoder") == "+text", "a text encoder changes the text cache only"
    tokenizer_config = base / "tokenizer" / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["model_max_length"] = 16  # shorter prompts: other token ids, other conditioning shapes
    tokenizer_config.write_text(json.dumps(settings))
    assert cache_after("max length") == "+text", "so does the tokenizer's max length"
    latents = {n for names in seen.values() for n in names if n.startswith("latents-")}
    assert len(latents) == 5, "base, resolution, flip, pixel limit, VAE: one folder each"
    texts = {n for names in seen.values() for n in names if n.startswith("text-")}
    assert len(texts) == 4, "base, caption, text encoder, max length: one folder each"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_digest_sees_dtype_and_weights(dtype):
    module = torch.nn.Linear(3, 2).to(dtype)
    before = lc.module_digest(module)
    assert lc.module_digest(module) == before
    with torch.no_grad():
        module.weight[0, 0] += 1
    assert lc.module_digest(module) != before
