"""The data front door (issue 15): a folder holding every kind of bad metadata line, bad image and odd file is read at
start, each problem named with its file and line and counted in one summary line; training goes on when usable data
remains (exit 0) and stops with one line and exit 2 when asked to (data.bad_metadata=error) or when nothing usable
is left. No input file is ever changed."""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from finetune.__main__ import main
from finetune.config import ConfigError, DataConfig
from finetune.data import (
    DataReport,
    ImageRecords,
    ImageTooLarge,
    build_image_source,
    check_dataset_columns,
    open_image,
)
from finetune.errors import RunError
from tests.helpers import PYTHON, REPO, reset_accelerate, subprocess_env

RNG = np.random.default_rng(0)

# metadata.jsonl of the bad folder, line by line (bytes: line 11 is not UTF-8, the file starts with a UTF-8 BOM)
LINES = [
    b'{"file_name": "good0.png", "text": "a toy picture 0"}',  # 1 fine
    b'{"file_name": "good1.png", "text": 13}',  # 2 caption is a number
    b'{"file_name": "good2.png", "text": null}',  # 3 caption is null
    b'{"file_name": "good3.png"}',  # 4 no caption key
    b'{"file_name": "good4.png", "text": ["a toy", 7]}',  # 5 a list holding a number
    b'{"file_name": "gone.png", "text": "a toy"}',  # 6 no such file
    b'{"file_name": "good0.png", "text": "again"}',  # 7 duplicate of line 1
    b"[1, 2]",  # 8 not an object
    b'{"text": "a toy without a file"}',  # 9 no file_name
    b'{"file_name": "folder.png", "text": "a toy"}',  # 10 a folder named like an image
    b'{"file_name": "good5.png", "text": "caf\xe9"}',  # 11 not UTF-8 (latin-1)
    b'{"file_name": "truncated.png", "text": "a toy truncated"}',  # 12 fine, but the image is unreadable
    b'{"file_name": "good6.png", "text": ["a toy one", "a toy two"]}',  # 13 fine: one of several captions
    b'{"file_name": "good7.png", "text": "a toy',  # 14 not JSON (cut short, no newline at the end)
]
CAPTION_LINES = {2, 3, 4, 5}  # bad only for a method that uses captions
FOLDER_SUMMARY = "data: 14 images in {folder}: "
LORA_SUMMARY = (
    "2 with captions, 4 not listed in metadata.jsonl (used without caption), 2 unreadable (loop.png, truncated.png), "
    "2 over data.max_image_pixels (bomb.png, huge.png), 11 lines skipped (metadata.jsonl line 2: caption 'text' is a "
    "number (13), not text; metadata.jsonl line 3: caption 'text' is null or empty; +9 more)"
)
NO_CAPTIONS_SUMMARY = (
    "10 used, 2 unreadable (loop.png, truncated.png), 2 over data.max_image_pixels (bomb.png, huge.png), 7 lines "
    "skipped (metadata.jsonl line 6: file_name 'gone.png': no such file in"
)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with next to no pixel data: made in microseconds, while decoding it
    whole would take width x height x 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def save_image(path: Path, size: int = 32) -> None:
    Image.fromarray(RNG.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def write_bad_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(8):
        save_image(folder / f"good{i}.png")
    for name in ("unlisted.png", "unlisted2.png"):  # in the folder, not in metadata.jsonl
        save_image(folder / name)
    (folder / "truncated.png").write_bytes((folder / "good0.png").read_bytes()[:80])
    (folder / "huge.png").write_bytes(png_header(10_000, 10_000))  # 100 MP: over the 64 MP default, under PIL's error
    (folder / "bomb.png").write_bytes(png_header(20_000, 20_000))  # 400 MP: PIL refuses it (DecompressionBombError)
    os.symlink("loop.png", folder / "loop.png")  # a link to itself
    (folder / "folder.png").mkdir()  # a folder named like an image
    (folder / "notes.txt").write_text("not an image, not a caption")
    (folder / "metadata.jsonl").write_bytes(codecs.BOM_UTF8 + b"\n".join(LINES))
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under the folder with its content hash (links by their target): compared before and after."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_symlink():
            entries[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = write_bad_folder(tmp_path_factory.mktemp("front_door") / "photos")
    before = snapshot(folder)
    yield folder
    assert snapshot(folder) == before, "an input file changed"


def source_of(folder: Path, columns=("text",), **data) -> ImageRecords:
    return build_image_source(DataConfig(dataset=str(folder), resolution=32, **data), columns=list(columns))


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---------------------------------------------------------------------------------------------------------------------
# reading the folder: counted, named, nothing decoded whole
# ---------------------------------------------------------------------------------------------------------------------
def test_every_bad_line_is_named_with_its_line_and_counted_in_one_summary(bad_folder, caplog):
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        source = source_of(bad_folder)
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: 14 images")]
    assert summaries == [FOLDER_SUMMARY.format(folder=bad_folder) + LORA_SUMMARY]
    log = warnings_of(caplog)
    for number, reason in [
        (2, "caption 'text' is a number (13), not text"),
        (3, "caption 'text' is null or empty"),
        (4, "no caption: no 'text' key (data.caption_column)"),
        (5, "caption 'text' is a list holding a number (7), not only text"),
        (6, "file_name 'gone.png': no such file"),
        (7, "file_name 'good0.png' repeats line 1 (the first one is used)"),
        (8, "not a JSON object but a list"),
        (9, "no 'file_name' key"),
        (10, "file_name 'folder.png' is a folder, not an image file"),
        (11, f"not valid UTF-8 (byte 0xe9 at column {LINES[10].index(0xE9) + 1})"),
        (14, "not JSON: Unterminated string starting at"),
    ]:
        assert f"data: metadata.jsonl line {number}: {reason}" in log
    assert "folder.png/ is a folder, not an image" in log
    assert "Too many levels of symbolic links" in log and "image file is truncated" in log
    # the images with a good line keep their captions; unlisted ones (and those whose line was not JSON / UTF-8) get
    # the empty prompt; the images named by lines with a bad caption are left out
    captions = {Path(source.image_sources[row]).name: source.column_values["text"][row] for row in source.indices}
    assert captions == {
        "good0.png": "a toy picture 0",
        "good6.png": ["a toy one", "a toy two"],
        "good5.png": "",
        "good7.png": "",
        "unlisted.png": "",
        "unlisted2.png": "",
    }
    rng = np.random.default_rng(0)
    assert all(source.get(i, rng)["pixel_values"].shape == (3, 32, 32) for i in range(len(source)))


def test_a_method_without_captions_gets_every_readable_image(bad_folder, caplog):
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        source = source_of(bad_folder, columns=())
    assert FOLDER_SUMMARY.format(folder=bad_folder) + NO_CAPTIONS_SUMMARY in caplog.text
    assert "caption" not in warnings_of(caplog), "caption problems are no concern of a method without captions"
    assert len(source) == 10


def test_unlisted_images_can_be_skipped(bad_folder, caplog):
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        source = source_of(bad_folder, unlisted_images="skip")
    assert "7 not listed in metadata.jsonl (skipped: data.unlisted_images=skip)" in caplog.text
    assert sorted(Path(source.image_sources[row]).name for row in source.indices) == ["good0.png", "good6.png"]


# each line is line 2 of a metadata.jsonl; `kept`: images trained on when the line is skipped (b.png with its caption,
# plus a.png without one unless the bad line names it: an image named by a bad line is left out with it)
@pytest.mark.parametrize(
    "line, reason, kept",
    [
        (b'{"file_name": "a.png", "text": 3.5}', "caption 'text' is a number (3.5), not text", 1),
        (b'{"file_name": "a.png", "text": false}', "caption 'text' is a boolean (false), not text", 1),
        (b'{"file_name": "a.png", "text": {"en": "x"}}', "caption 'text' is an object, not text", 1),
        (b'{"file_name": "a.png", "text": []}', "caption 'text' is an empty list", 1),
        (b'{"file_name": 7, "text": "x"}', "file_name is a number (7), not a file name", 2),
        (b'{"file_name": "../a.png", "text": "x"}', "file_name '../a.png' is outside the folder", 2),
        (b'{"file_name": "notes.txt", "text": "x"}', "file_name 'notes.txt' is not an image file", 2),
        (b'"just a string"', "not a JSON object but str", 2),
        (b"\xff\xfe{", "not valid UTF-8 (byte 0xff at column 1)", 2),
        (b'{"file_name": "a.png", "text": "x"', "not JSON: Expecting ',' delimiter (column 35)", 2),
    ],
)
def test_bad_metadata_error_stops_at_the_line_naming_file_line_and_fix(tmp_path, line, reason, kept):
    folder = tmp_path / "one_bad_line"
    folder.mkdir()
    save_image(folder / "a.png")
    save_image(folder / "b.png")
    (folder / "notes.txt").write_text("x")
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "b.png", "text": "fine"}\n' + line + b"\n")
    with pytest.raises(ConfigError) as err:
        source_of(folder, bad_metadata="error")
    message = str(err.value)
    assert message.startswith(f"data: metadata.jsonl line 2 in {folder}: {reason}"), message
    assert message.endswith(
        ". Fix or delete the line, or set data.bad_metadata=skip to skip bad lines (they are counted)"
    )
    assert "\n" not in message
    assert len(source_of(folder)) == kept, "skipped by default"


def test_other_encodings_and_formats(tmp_path, caplog):
    def folder_with(name: str, metadata: bytes | None = None, **files: bytes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for image in ("a.png", "b.png"):
            save_image(folder / image)
        if metadata is not None:
            (folder / ("metadata.csv" if name.startswith("csv") else "metadata.jsonl")).write_bytes(metadata)
        for file, data in files.items():
            (folder / file.replace("_", ".")).write_bytes(data)
        return folder

    def captions(folder: Path, **data) -> dict[str, object]:
        source = source_of(folder, **data)
        return {Path(source.image_sources[r]).name: source.column_values["text"][r] for r in source.indices}

    lines = '{"file_name": "a.png", "text": "caption a"}\n{"file_name": "b.png", "text": "caption b"}\n'
    both = {"a.png": "caption a", "b.png": "caption b"}
    assert captions(folder_with("bom", codecs.BOM_UTF8 + lines.encode())) == both  # a UTF-8 BOM just works
    assert captions(folder_with("utf16", lines.encode("utf-16"))) == both  # UTF-16 with its BOM is read as such
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        with pytest.raises(
            ConfigError, match=r"has no usable line \(. bad, first metadata.jsonl line 1: .*UTF-16 without"
        ):
            captions(folder_with("utf16_no_bom", lines.encode("utf-16-le")))
    csv = b'file_name,text\na.png,"caption a, with a comma\nand a second line"\nb.png,\nc.png,x,y\n'
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        assert captions(folder_with("csv", csv)) == {"a.png": "caption a, with a comma\nand a second line"}
    assert "metadata.csv line 4: caption 'text' is null or empty; skipped" in caplog.text
    assert "metadata.csv line 5: 3 fields, the header line has 2; skipped" in caplog.text
    # kohya's .txt captions: an unreadable one is a bad caption file, an image without one is "unlisted"
    kohya = folder_with("kohya", None, a_txt=b"caption a\n", b_txt=b"caf\xe9")
    save_image(kohya / "c.png")
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        assert captions(kohya) == {"a.png": "caption a", "c.png": ""}
    assert (
        f"data: 3 images in {kohya}: 1 with captions, 1 without a .txt caption (used without caption), 1 caption file "
        "skipped (b.txt: not valid UTF-8 (byte 0xe9 at column 4))" in caplog.text
    )
    with pytest.raises(ConfigError, match=rf"^data: b.txt in {kohya}: not valid UTF-8 .* Fix or delete the caption"):
        captions(kohya, bad_metadata="error")
    # no line names an image: a wrong key, said once, not 2 bad lines
    wrong_key = folder_with("wrong_key", b'{"image": "a.png", "text": "x"}\n')
    with pytest.raises(ConfigError, match=r"no line has a 'file_name' key \(keys found: image, text\)"):
        captions(wrong_key)


def test_nothing_usable_left_is_a_clear_error(tmp_path):
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(ConfigError, match=r"has no readable images \(1 images in .*: 0 with captions, 1 unreadable"):
        source_of(folder)
    (folder / "a.png").unlink()
    save_image(folder / "b.png")
    save_image(folder / "c.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "b.png", "text": null}\n')
    with pytest.raises(ConfigError, match=r"none of the images in .* has a usable caption \(.*1 line skipped"):
        source_of(folder)
    with pytest.raises(ConfigError, match=r"has no usable images \(.*0 with captions, 1 not listed"):
        source_of(folder, unlisted_images="skip")


def test_large_images_are_never_decoded_whole(tmp_path, recwarn):
    folder = tmp_path / "large"
    folder.mkdir()
    (folder / "huge.png").write_bytes(png_header(10_000, 10_000))
    (folder / "bomb.png").write_bytes(png_header(20_000, 20_000))
    Image.new("RGB", (400, 400), (200, 30, 30)).save(folder / "big.jpg")
    save_image(folder / "small.png", 64)
    with pytest.raises(ImageTooLarge, match=r"too large: 10000x10000 = 100.0 MP, over data.max_image_pixels = 64.0"):
        open_image(folder / "huge.png", 64_000_000)
    with pytest.raises(ImageTooLarge, match="over PIL's decompression-bomb limit"):
        open_image(folder / "bomb.png", None)
    # a JPEG is decoded at 1/2 scale (draft mode) when that brings it under the limit; a PNG is skipped
    assert open_image(folder / "big.jpg", 50_000).size == (200, 200)
    assert open_image(folder / "big.jpg").size == (400, 400)
    source = source_of(folder, columns=(), max_image_pixels=3_000)  # 400x400 -> 50x50 at 1/8 scale
    assert sorted(Path(source.image_sources[r]).name for r in source.indices) == ["big.jpg"]
    assert sorted(Path(name).name for _, name, _ in source.too_large) == ["bomb.png", "huge.png", "small.png"]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(ConfigError, match="data.max_image_pixels must be null or at least"):
        DataConfig(resolution=64, max_image_pixels=1000)


def test_a_file_that_vanishes_mid_run_is_replaced_then_a_clear_error(tmp_path, caplog):
    folder = tmp_path / "vanishing"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        save_image(folder / name)
    source = source_of(folder, columns=())
    (folder / "a.png").unlink()
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        example = source.get(0, np.random.default_rng(0))
    assert example["row"] == 1, "b.png takes the vanished a.png's place"
    assert "a.png cannot be read any more (FileNotFoundError" in caplog.text
    (folder / "b.png").write_bytes(b"damaged")
    with pytest.raises(RunError, match=r"none of the 2 images of .* can be read any more"):
        source.get(1, np.random.default_rng(0))


def test_dataset_rows_with_bad_captions_are_found_at_start():
    import datasets

    records = datasets.Dataset.from_dict({"image": ["a.png", "b.png", "c.png"], "text": ["fine", None, "also"]})
    config = DataConfig(dataset="user/photos")
    report = DataReport("user/photos", total=3, uses_captions=True)
    check_dataset_columns(records, config, ["text"], report)
    assert report.excluded_rows == {1} and str(report.bad[0]) == "row 1: caption 'text' is null or empty"
    report = DataReport("user/photos", total=3, uses_captions=True)
    with pytest.raises(
        ConfigError, match=r"^data: row 1 in user/photos: caption 'text' is null or empty. Fix the row"
    ):
        check_dataset_columns(records, DataConfig(dataset="user/photos", bad_metadata="error"), ["text"], report)


# ---------------------------------------------------------------------------------------------------------------------
# training through the real entry point
# ---------------------------------------------------------------------------------------------------------------------
def recipe(base: Path, folder: Path, output_dir: Path, method: str, batch: int = 2, **options) -> dict:
    values = {
        "method": method,
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"dataset": str(folder), "resolution": 32},
        "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
        "diffusion": {"num_inference_steps": 1},
        "train": {
            "output_dir": str(output_dir),
            "max_train_steps": 1,
            "train_batch_size": batch,
            "log_every": 1,
            "num_samples": 1,
            "report_to": "jsonl",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 0},
        method: options,
    }
    return values


def run_main(tmp_path: Path, values: dict, *overrides: str) -> int:
    path = tmp_path / f"recipe-{values['method']}.yaml"
    path.write_text(yaml.safe_dump(values))
    reset_accelerate()
    return main([str(path), *overrides])


def summary_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: 14 images")]
    assert len(lines) == 1, lines
    return lines[0]


def test_lora_trains_on_what_is_left_and_says_what_it_left_out(tiny_sd_dir, bad_folder, tmp_path, caplog, capsys):
    values = recipe(tiny_sd_dir, bad_folder, tmp_path / "lora", "lora", batch=8, rank=4)
    with caplog.at_level(logging.INFO):
        assert run_main(tmp_path, values) == 0
    assert summary_line(caplog) == FOLDER_SUMMARY.format(folder=bad_folder) + LORA_SUMMARY
    assert (
        "data: 6 example(s) for a batch of 8 (train.train_batch_size 8 x 1 process(es)): examples repeat within every "
        "batch (2 copies of each per epoch). Add images, or set train.train_batch_size=6" in caplog.text
    )
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    caplog.clear()
    assert run_main(tmp_path, values, f"train.output_dir={tmp_path / 'lora-error'}", "data.bad_metadata=error") == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"data: metadata.jsonl line 2 in {bad_folder}: caption 'text' is a number (13), not text. Fix or delete "
            "the line, or set data.bad_metadata=skip to skip bad lines (they are counted)"
        )
    )


@pytest.mark.parametrize("method", ["dreambooth", "textual_inversion"])
def test_methods_without_captions_do_not_die_on_captions(method, tiny_sd_dir, bad_folder, tmp_path, caplog, capsys):
    if method == "dreambooth":
        options = {"instance_data_dir": str(bad_folder), "instance_prompt": "a photo of sks toy", "use_lora": True}
    else:
        options = {"placeholder_token": "<toy-cat>", "initializer_token": "toy"}
    values = recipe(tiny_sd_dir, bad_folder, tmp_path / method, method, **options)
    with caplog.at_level(logging.INFO):
        assert run_main(tmp_path, values) == 0
    assert summary_line(caplog).startswith(FOLDER_SUMMARY.format(folder=bad_folder) + NO_CAPTIONS_SUMMARY)
    assert "caption" not in warnings_of(caplog).replace("caption file", "")
    # asked to stop at a bad line, they stop at the first one that concerns them (line 6), not at a caption
    assert run_main(tmp_path, values, f"train.output_dir={tmp_path / 'error'}", "data.bad_metadata=error") == 2
    assert (
        f"data: metadata.jsonl line 6 in {bad_folder}: file_name 'gone.png': no such file" in capsys.readouterr().err
    )


def test_the_command_line_shows_no_traceback_and_no_pil_warning(tiny_sd_dir, bad_folder, tmp_path):
    values = recipe(tiny_sd_dir, bad_folder, tmp_path / "cli", "textual_inversion", use_captions=True)
    values["textual_inversion"].update(placeholder_token="<toy-cat>", initializer_token="toy")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    # use_captions: every caption must hold the placeholder, and the folder's captions don't: exit 2, one line
    result = subprocess.run(
        [PYTHON, "-m", "finetune", str(path)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "DecompressionBomb" not in output
    assert FOLDER_SUMMARY.format(folder=bad_folder) + "2 with captions" in output
    assert "do not contain the placeholder '<toy-cat>'" in output.strip().splitlines()[-1]
