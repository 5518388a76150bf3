"""Build a ControlNet dataset from a folder of images: ``python -m captioning.conditioning IMAGE_DIR``.

Each image gets a conditioning image made by a dependency-free annotator (numpy and PIL only), written to
IMAGE_DIR/conditioning/<same relative path>.png, and IMAGE_DIR/metadata.jsonl gets (or keeps) one line per image with
`file_name`, its caption (`text`, kept from an existing metadata.jsonl, else a .txt beside the image, else --caption)
and `conditioning_image`, the path the `controlnet` method reads (data.conditioning_image_column). The conditioning/
folder is never read as training images.

Annotators:
- ``canny``: Canny-like edges (Canny 1986): Gaussian smoothing, Sobel gradients, non-maximum suppression along the
  gradient direction, double threshold and hysteresis; white edges on black, as the Canny ControlNets take them.
- ``blur``: the image reduced to a coarse grid (``--blur-cells``, default 4 x 4) and enlarged back (box filter, then
  nearest neighbour): a control that keeps only the layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from finetune import atomic
from finetune.errors import InputError
from finetune.imaging import IMAGE_EXTENSIONS, open_image, to_mode

CONDITIONING_DIR = "conditioning"
COLUMN = "conditioning_image"


def sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical Sobel derivatives of a 2-D array (edges replicated)."""
    padded = np.pad(gray, 1, mode="edge")

    def at(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + gray.shape[0], 1 + dx : 1 + dx + gray.shape[1]]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return gx, gy


def canny_edges(image: Image.Image, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> Image.Image:
    """Canny-like edge map (Canny 1986) of an image, 'L' with edges 255: thresholds are fractions of the largest
    gradient magnitude; weak edges survive when connected (8-neighbourhood) to a strong one."""
    gray = to_mode(image, 1)
    if sigma > 0:
        gray = gray.filter(ImageFilter.GaussianBlur(sigma))
    array = np.asarray(gray, dtype=np.float64) / 255.0
    gx, gy = sobel(array)
    magnitude = np.hypot(gx, gy)
    peak = magnitude.max()
    if peak <= 0:
        return Image.new("L", image.size, 0)
    magnitude /= peak
    # non-maximum suppression: keep a pixel where it is the largest of its two neighbours along the gradient
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    direction = np.digitize(angle, [22.5, 67.5, 112.5, 157.5]) % 4  # 0: horizontal gradient, 1: 45, 2: 90, 3: 135
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    padded = np.pad(magnitude, 1)
    height, width = magnitude.shape
    keep = np.zeros_like(magnitude, dtype=bool)
    for index, (dy, dx) in offsets.items():
        ahead = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        behind = padded[1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]
        keep |= (direction == index) & (magnitude >= ahead) & (magnitude >= behind)
    thin = np.where(keep, magnitude, 0.0)
    strong, weak = thin >= high, thin >= low
    # hysteresis: grow the strong edges through weak pixels until nothing changes
    edges = strong
    while True:
        grown = np.pad(edges, 1)
        neighbours = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                neighbours |= grown[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        grown = weak & neighbours
        if np.array_equal(grown | edges, edges):
            break
        edges = edges | grown
    return Image.fromarray((edges * 255).astype(np.uint8), mode="L")


def coarse_blur(image: Image.Image, cells: int = 4) -> Image.Image:
    """The image averaged over a cells x cells grid (box filter) and enlarged back with nearest neighbour."""
    small = to_mode(image, 3).resize((cells, cells), Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.NEAREST)


ANNOTATORS = {"canny": "edges", "blur": "coarse colour layout"}


def annotate(
    image: Image.Image, annotator: str, low: float = 0.1, high: float = 0.2, cells: int = 4, sigma: float = 1.0
) -> Image.Image:
    """The conditioning image of `image` by one of ANNOTATORS, RGB."""
    if annotator == "canny":
        return canny_edges(image, low, high, sigma).convert("RGB")
    return coarse_blur(image, cells)


def _existing_metadata(folder: Path) -> dict[str, dict]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    lines = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as err:
            raise InputError(f"{path} line {number}: not JSON ({err}); fix or delete the line") from err
        if not isinstance(value, dict) or not isinstance(value.get("file_name"), str):
            raise InputError(f"{path} line {number}: no 'file_name'; fix or delete the line")
        lines[value["file_name"]] = value
    return lines


def build_conditioning_dataset(
    folder: Path,
    annotator: str = "canny",
    low: float = 0.1,
    high: float = 0.2,
    cells: int = 4,
    caption: str | None = None,
    overwrite: bool = False,
    sigma: float = 1.0,
) -> tuple[int, int]:
    """Write the conditioning images and metadata.jsonl of `folder`; return (images annotated, already there)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"IMAGE_DIR: the folder {str(folder)!r} does not exist")
    images = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and CONDITIONING_DIR not in p.relative_to(folder).parts
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not images:
        raise InputError(f"IMAGE_DIR: {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    metadata = _existing_metadata(folder)
    made = kept = 0
    lines = []
    for name in images:
        target = Path(CONDITIONING_DIR) / Path(name).with_suffix(".png")
        line = dict(metadata.get(name, {"file_name": name}))
        if "text" not in line:
            sidecar = (folder / name).with_suffix(".txt")
            if sidecar.is_file():
                line["text"] = sidecar.read_text(encoding="utf-8").strip()
            elif caption is not None:
                line["text"] = caption
        line[COLUMN] = target.as_posix()
        lines.append(line)
        if (folder / target).is_file() and not overwrite:
            kept += 1
            continue
        try:
            image = open_image(folder / name)
        except Exception as err:  # noqa: BLE001 - name the file, go on with the others
            print(f"skipped {name}: unreadable ({type(err).__name__})", file=sys.stderr)
            lines.pop()
            continue
        control = annotate(to_mode(image, 3), annotator, low, high, cells, sigma)
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(folder / target) as temporary:
            control.save(temporary, format="PNG")
        made += 1
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    atomic.atomic_write_text(folder / "metadata.jsonl", text)
    return made, kept


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m captioning.conditioning",
        description="Make a ControlNet dataset from IMAGE_DIR: a conditioning image per image in "
        f"IMAGE_DIR/{CONDITIONING_DIR}/ and its path in the '{COLUMN}' key of IMAGE_DIR/metadata.jsonl (captions "
        "kept). Then: accelerate launch -m finetune finetune/recipes/sd_controlnet.yaml data.dataset=IMAGE_DIR",
    )
    parser.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images (searched recursively)")
    parser.add_argument("--annotator", choices=sorted(ANNOTATORS), default="canny", help="canny edges or coarse blur")
    parser.add_argument("--low", type=float, default=0.1, help="canny: weak-edge threshold, fraction of the peak")
    parser.add_argument("--high", type=float, default=0.2, help="canny: strong-edge threshold, fraction of the peak")
    parser.add_argument("--sigma", type=float, default=1.0, help="canny: Gaussian smoothing first (0: none)")
    parser.add_argument("--blur-cells", type=int, default=4, help="blur: grid cells per side (default 4)")
    parser.add_argument("--caption", default=None, help="caption of images that have none (metadata or .txt)")
    parser.add_argument("--overwrite", action="store_true", help="remake conditioning images that exist")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.low <= args.high <= 1:
            raise InputError(f"--low {args.low} and --high {args.high}: need 0 <= low <= high <= 1")
        if args.blur_cells < 1:
            raise InputError(f"--blur-cells must be >= 1, got {args.blur_cells}")
        made, kept = build_conditioning_dataset(
            Path(args.image_dir),
            args.annotator,
            args.low,
            args.high,
            args.blur_cells,
            args.caption,
            args.overwrite,
            args.sigma,
        )
    except InputError as err:
        print(f"difftune: {err}", file=sys.stderr)
        return 2
    print(f"{made} conditioning images written ({args.annotator}), {kept} kept; metadata.jsonl updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
