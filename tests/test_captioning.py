"""Captioning a folder with a tiny BLIP: output format, resuming, safety of existing captions, several processes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from captioning.__main__ import main
from captioning.caption import (
    METADATA_FILENAME,
    STATE_DIRNAME,
    BlipCaptioner,
    CaptionOptions,
    GenerationSettings,
    caption_folder,
    load_image,
)
from tests.helpers import two_cpu_processes_launch
from tests.tiny_models import make_test_images

REPO_ROOT = Path(__file__).resolve().parent.parent
# Greedy and short: the tiny random model never ends a caption on its own, so length drives the test's speed.
FAST_GENERATION = GenerationSettings(decoding="beam", num_beams=1, min_new_tokens=3, max_new_tokens=6)
FAST_CLI_ARGS = ["--num-beams", "1", "--min-length", "3", "--max-length", "6", "--no-progress"]


def read_metadata(image_dir: Path) -> list[dict]:
    lines = (image_dir / METADATA_FILENAME).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def captions_by_file(image_dir: Path) -> dict[str, str]:
    records = read_metadata(image_dir)
    file_names = [record["file_name"] for record in records]
    assert len(file_names) == len(set(file_names)), f"an image appears twice: {file_names}"
    return {record["file_name"]: record["text"] for record in records}


def expected_captions(model_dir: Path, image_dir: Path, file_names: list[str], generation=FAST_GENERATION) -> dict:
    """What the model says for each image alone, to check that every caption landed on its own image."""
    captioner = BlipCaptioner.from_pretrained(str(model_dir), device="cpu", generation=generation)
    return {name: captioner.caption([load_image(image_dir / name)])[0] for name in file_names}


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Five images at the top, two in a subfolder, and four files that cannot be captioned."""
    folder = tmp_path / "images"
    make_test_images(folder, 5)
    make_test_images(folder / "sub folder", 2, seed=1)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # PNG signature, garbage after
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text pretending.jpg").write_text("not a picture", encoding="utf-8")
    (folder / "notes.txt").write_text("shot list for the dataset", encoding="utf-8")
    return folder


GOOD_IMAGES = [f"image_00{index}.png" for index in range(5)] + [f"sub folder/image_00{index}.png" for index in (0, 1)]


def test_captions_folder_into_imagefolder_dataset(tmp_path, image_dir, tiny_blip_dir, capsys):
    exit_code = main(
        [
            str(image_dir),
            "--model",
            str(tiny_blip_dir),
            "--batch-size",
            "3",
            "--write-txt",
            "--caption-prefix",
            "sks toy,",
            *FAST_CLI_ARGS,
        ]
    )
    assert exit_code == 0
    output = capsys.readouterr().out
    assert "Captioned 7 images" in output and "failed 3" in output
    for bad_file in ("corrupt.png", "empty.jpg", "text pretending.jpg"):
        assert f"failed: {bad_file}" in output
    assert "not images: notes.txt" in output

    captions = captions_by_file(image_dir)
    assert sorted(captions) == sorted(GOOD_IMAGES)
    expected = expected_captions(tiny_blip_dir, image_dir, GOOD_IMAGES)
    assert captions == {name: f"sks toy, {caption}" for name, caption in expected.items()}
    for name, caption in captions.items():
        assert (image_dir / name).with_suffix(".txt").read_text(encoding="utf-8") == caption + "\n"
    assert (image_dir / "notes.txt").read_text(encoding="utf-8") == "shot list for the dataset"
    assert not (image_dir / STATE_DIRNAME).exists()

    import datasets

    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(image_dir), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert dataset.column_names == ["image", "text"]
    assert len(dataset) == 7
    paths = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    loaded = {
        Path(entry["path"]).relative_to(image_dir).as_posix(): text for entry, text in zip(paths, dataset["text"])
    }
    assert loaded == captions
    assert dataset[0]["image"].size == (64, 64)


def test_existing_captions_are_kept_unless_overwrite(image_dir, tiny_blip_dir):
    person_metadata = [
        {"file_name": "image_000.png", "text": "my red circle", "rating": 5},
        {"file_name": "./image_002.png", "text": "   ", "rating": 3},  # no caption yet, despite the entry
        {"file_name": "gone/elsewhere.png", "text": "an image moved away"},
        {"file_name": "image_003.png", "text": ["several captions", "for one image"]},
    ]
    (image_dir / METADATA_FILENAME).write_text("".join(json.dumps(r) + "\n" for r in person_metadata), "utf-8")
    (image_dir / "image_001.txt").write_text("my caption in a sidecar\n", encoding="utf-8")
    options = CaptionOptions(model=str(tiny_blip_dir), generation=FAST_GENERATION, show_progress=False)

    summary = caption_folder(image_dir, options)
    records = read_metadata(image_dir)
    by_name = {record["file_name"]: record for record in records}
    assert by_name["image_000.png"] == {"file_name": "image_000.png", "text": "my red circle", "rating": 5}
    assert by_name["gone/elsewhere.png"] == {"file_name": "gone/elsewhere.png", "text": "an image moved away"}
    assert by_name["image_001.png"]["text"] == "my caption in a sidecar"  # copied from the sidecar, which stays
    assert (image_dir / "image_001.txt").read_text(encoding="utf-8") == "my caption in a sidecar\n"
    assert by_name["./image_002.png"]["rating"] == 3 and by_name["./image_002.png"]["text"].strip()
    assert by_name["image_003.png"]["text"] == ["several captions", "for one image"]
    assert sorted(summary.captioned) == sorted(set(GOOD_IMAGES) - {"image_000.png", "image_001.png", "image_003.png"})
    assert summary.skipped_existing == 3 and summary.imported_sidecars == 1
    assert summary.missing_files_in_metadata == ["gone/elsewhere.png"]
    assert len(records) == 4 + 4  # the person's four entries, then image_001 (from its sidecar) and three new ones

    # A second run has nothing to do and changes nothing.
    before = (image_dir / METADATA_FILENAME).read_bytes()
    assert caption_folder(image_dir, options).captioned == []
    assert (image_dir / METADATA_FILENAME).read_bytes() == before

    # --overwrite replaces the captions but keeps the other columns and the entries of other files.
    summary = caption_folder(image_dir, dataclasses.replace(options, overwrite=True))
    assert sorted(summary.captioned) == sorted(GOOD_IMAGES)
    by_name = {record["file_name"]: record for record in read_metadata(image_dir)}
    assert by_name["image_000.png"]["rating"] == 5 and by_name["image_000.png"]["text"] != "my red circle"
    assert by_name["image_001.png"]["text"] != "my caption in a sidecar"
    assert by_name["gone/elsewhere.png"]["text"] == "an image moved away"
    assert (image_dir / "image_001.txt").read_text(encoding="utf-8") == "my caption in a sidecar\n"  # no --write-txt


def test_resumes_after_kill_without_repeating_or_losing_captions(image_dir, tiny_blip_dir):
    person_line = json.dumps({"file_name": "image_000.png", "text": "captioned by hand"}) + "\n"
    (image_dir / METADATA_FILENAME).write_text(person_line, encoding="utf-8")
    part_file = image_dir / STATE_DIRNAME / "part-0.jsonl"
    # The real command, slowed to one batch a second so that the kill lands in the middle of the run.
    script = textwrap.dedent(
        """
        import sys, time
        from captioning import caption
        real_caption = caption.BlipCaptioner.caption
        def slow_caption(self, images):
            time.sleep(1.0)
            return real_caption(self, images)
        caption.BlipCaptioner.caption = slow_caption
        from captioning.__main__ import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    command = [
        sys.executable,
        "-c",
        script,
        str(image_dir),
        "--model",
        str(tiny_blip_dir),
        "--batch-size",
        "2",
        *FAST_CLI_ARGS,
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not (part_file.exists() and part_file.read_text(encoding="utf-8").count("\n") >= 2):
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "no batch was written in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"

    # Killed mid-run: metadata.jsonl is untouched, the finished batches are on disk.
    assert (image_dir / METADATA_FILENAME).read_text(encoding="utf-8") == person_line
    done_before_kill = {}
    for line in part_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        done_before_kill[record["file_name"]] = record["text"]
    assert 2 <= len(done_before_kill) < 6

    options = CaptionOptions(model=str(tiny_blip_dir), batch_size=2, generation=FAST_GENERATION, show_progress=False)
    summary = caption_folder(image_dir, options)
    assert summary.resumed == len(done_before_kill)
    assert not set(summary.captioned) & set(done_before_kill), "an image was captioned twice"
    assert sorted(summary.captioned) == sorted(set(GOOD_IMAGES) - {"image_000.png"} - set(done_before_kill))

    captions = captions_by_file(image_dir)
    assert sorted(captions) == sorted(GOOD_IMAGES)
    assert captions["image_000.png"] == "captioned by hand"
    assert {name: captions[name] for name in done_before_kill} == done_before_kill
    assert not (image_dir / STATE_DIRNAME).exists()


def test_unfinished_last_line_of_a_part_file_is_captioned_again(image_dir, tiny_blip_dir):
    state_dir = image_dir / STATE_DIRNAME
    state_dir.mkdir()
    finished = [{"file_name": "image_000.png", "text": "first batch"}, {"file_name": "image_001.png", "text": "too"}]
    cut_short = json.dumps({"file_name": "image_002.png", "text": "a write cut by a kill"})[:25]
    (state_dir / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finished) + cut_short, "utf-8")

    options = CaptionOptions(model=str(tiny_blip_dir), generation=FAST_GENERATION, show_progress=False)
    summary = caption_folder(image_dir, options)
    assert summary.resumed == 2 and "image_002.png" in summary.captioned
    captions = captions_by_file(image_dir)
    assert sorted(captions) == sorted(GOOD_IMAGES)
    assert captions["image_000.png"] == "first batch" and captions["image_001.png"] == "too"
    assert captions["image_002.png"] == expected_captions(tiny_blip_dir, image_dir, ["image_002.png"])["image_002.png"]


def test_prompt_prefix_and_sampling(tmp_path, tiny_blip_dir):
    folder = tmp_path / "images"
    make_test_images(folder, 4)
    sampling = GenerationSettings(decoding="sample", top_p=0.9, min_new_tokens=3, max_new_tokens=6)
    options = CaptionOptions(
        model=str(tiny_blip_dir),
        generation=sampling,
        prompt="a photograph of",
        caption_suffix="by sks",
        show_progress=False,
        seed=7,
    )
    caption_folder(folder, options)
    first = captions_by_file(folder)
    assert all(text.startswith("a photograph of") and text.endswith(" by sks") for text in first.values())
    caption_folder(folder, dataclasses.replace(options, overwrite=True))
    assert captions_by_file(folder) == first, "the same seed must give the same sampled captions"


def test_bad_input_is_reported_clearly(tmp_path, capsys, tiny_blip_dir):
    missing = tmp_path / "no such folder"
    assert main([str(missing), "--model", str(tiny_blip_dir)]) == 2
    assert f"image folder does not exist: {missing}" in capsys.readouterr().err

    only_text = tmp_path / "only text"
    only_text.mkdir()
    (only_text / "readme.txt").write_text("hello", encoding="utf-8")
    assert main([str(only_text), "--model", str(tiny_blip_dir)]) == 2
    assert "no images found under" in capsys.readouterr().err

    broken_metadata = tmp_path / "broken metadata"
    make_test_images(broken_metadata, 1)
    metadata_text = '{"file_name": "image_000.png", "text": "fine"}\n{"file_name": oops\n'
    (broken_metadata / METADATA_FILENAME).write_text(metadata_text, encoding="utf-8")
    assert main([str(broken_metadata), "--model", str(tiny_blip_dir)]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    assert (broken_metadata / METADATA_FILENAME).read_text(encoding="utf-8") == metadata_text

    good_images = tmp_path / "good images"
    make_test_images(good_images, 1)
    assert main([str(good_images), "--model", str(tmp_path / "no model here")]) == 2
    assert "cannot load a model config" in capsys.readouterr().err


def test_push_to_hub_uploads_the_captioned_dataset(tmp_path, image_dir, tiny_blip_dir, monkeypatch, capsys):
    import datasets

    pushed = []

    def fake_push_to_hub(self, repo_id, **kwargs):
        pushed.append({"repo_id": repo_id, "rows": len(self), "texts": sorted(self["text"]), **kwargs})

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", fake_push_to_hub)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    secret = "hf_thisIsNotARealTokenButMustNeverBePrinted"
    exit_code = main(
        [
            str(image_dir),
            "--model",
            str(tiny_blip_dir),
            *FAST_CLI_ARGS,
            "--push-to-hub",
            "someone/captioned-toys",
            "--private",
            "--hub-token",
            secret,
        ]
    )
    assert exit_code == 0
    assert len(pushed) == 1
    assert pushed[0]["repo_id"] == "someone/captioned-toys"
    assert pushed[0]["private"] is True and pushed[0]["token"] == secret
    assert pushed[0]["rows"] == 7 and pushed[0]["texts"] == sorted(captions_by_file(image_dir).values())
    output = capsys.readouterr()
    assert "someone/captioned-toys" in output.out
    assert secret not in output.out + output.err

    # A failed upload keeps the captions and says how to retry; the retry captions nothing again.
    def failing_push_to_hub(self, repo_id, **kwargs):
        raise OSError("401 Client Error: Unauthorized")

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", failing_push_to_hub)
    arguments = [str(image_dir), "--model", str(tiny_blip_dir), *FAST_CLI_ARGS, "--push-to-hub", "someone/toys"]
    assert main([*arguments, "--hub-token", secret]) == 1
    output = capsys.readouterr()
    assert "Captioned 0 images" in output.out and "the upload failed" in output.err and "401" in output.err
    assert secret not in output.out + output.err

    with pytest.raises(SystemExit):  # an invalid repo id stops the command before any captioning
        main([str(image_dir), "--push-to-hub", "not a valid/repo/id"])
    assert "--push-to-hub" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_two_processes_caption_each_image_once(image_dir, tiny_blip_dir):
    command = [
        *two_cpu_processes_launch(),
        "-m",
        "captioning",
        str(image_dir),
        "--model",
        str(tiny_blip_dir),
        "--batch-size",
        "2",
        *FAST_CLI_ARGS,
    ]
    # ACCELERATE_USE_CPU turns --multi_gpu into two gloo processes on the CPU.
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Captioned 7 images on 2 processes" in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("Captioned ") == 1, "only the main process prints the summary"
    assert "failed 3" in result.stdout, "failures seen by either process are reported"
    captions = captions_by_file(image_dir)
    assert captions == expected_captions(tiny_blip_dir, image_dir, GOOD_IMAGES)
    assert not (image_dir / STATE_DIRNAME).exists()
