"""The built-in demo dataset: deterministic synthetic shapes in a Roboflow export layout.

    python -m detr_lightning.data.demo OUT [--num-train 300 --num-val 50 --num-test 50 --seed 0]
        [--crowded | --realistic] [--processes N]

Squares, discs and triangles of varied size (15–80 px), colour and count (0–4 per image) on cluttered
backgrounds, in 128–192 px images, so that a small DETR learns them on 2 CPU cores in minutes. It has
the quirks of real exports on purpose:

- an id-0 supercategory ``shapes`` with no annotations (as Roboflow writes), and non-contiguous ids
  (square 1, disc 2, triangle 4): raw ``num_classes`` is 5, contiguous ``num_classes`` is 3;
- a crowd annotation (a cluster of tiny discs) in image 2 of train and valid;
- images without objects (image 1 of every split, plus the random ones);
- a grayscale JPEG (image 3 of train).

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so the output is a
function of the arguments alone and adding images leaves the first ones unchanged. `DEMO_VARIANTS`:
``--crowded`` (``data=demo_crowded``) for convergence comparisons, ``--realistic`` (``data=coco_like``)
for speed measurements with the official scales (480-800, max 1333).
"""

from __future__ import annotations

import argparse
import colorsys
import concurrent.futures
import json
import logging
import multiprocessing
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from detr_lightning.data.errors import DataError
from detr_lightning.data.layout import ROBOFLOW_ANNOTATION_NAME

log = logging.getLogger(__name__)

DEMO_SPLIT_FOLDERS = {"train": "train", "val": "valid", "test": "test"}
DEMO_CATEGORIES = [
    {"id": 0, "name": "shapes", "supercategory": "none"},
    {"id": 1, "name": "square", "supercategory": "shapes"},
    {"id": 2, "name": "disc", "supercategory": "shapes"},
    {"id": 4, "name": "triangle", "supercategory": "shapes"},
]
SQUARE, DISC, TRIANGLE = 1, 2, 4
MIN_OBJECT_SIZE, MAX_OBJECT_SIZE = 15, 80
OBJECT_COUNT_PROBABILITIES = (0.1, 0.3, 0.25, 0.2, 0.15)  # 0..4 objects
# `DemoShapes` fields of the variants: larger images with more and smaller shapes, and COCO-like sizes.
CROWDED_DEMO_OPTIONS = dict(
    min_side=192, max_side=256, min_object_size=10, max_object_size=40, max_objects=10
)
REALISTIC_DEMO_OPTIONS = dict(
    min_side=640, max_side=1024, min_object_size=16, max_object_size=320, max_objects=20
)
DEMO_VARIANTS = {
    "crowded": ("the harder variant", CROWDED_DEMO_OPTIONS),
    "realistic": ("COCO-like sizes", REALISTIC_DEMO_OPTIONS),
}
EMPTY_IMAGE_INDEX, CROWD_IMAGE_INDEX, GRAYSCALE_IMAGE_INDEX = 1, 2, 3
Box = tuple[int, int, int, int]  # x, y, width, height in pixels


@dataclass(frozen=True)
class DemoShapes:
    """Image sides and shapes of a demo dataset; the defaults are the built-in demo's.

    Shapes have sides in ``[min_object_size, max_object_size]`` (capped at 0.6 of the shorter image
    side). ``max_objects=None`` draws 0-4 shapes with the demo's fixed probabilities; an integer draws
    1 to ``max_objects`` uniformly (shapes that find no free place are dropped).
    """

    min_side: int = 128
    max_side: int = 192
    min_object_size: int = MIN_OBJECT_SIZE
    max_object_size: int = MAX_OBJECT_SIZE
    max_objects: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.min_object_size <= self.max_object_size:
            raise DataError(
                f"demo object sizes must satisfy 0 < min_object_size ({self.min_object_size}) <= "
                f"max_object_size ({self.max_object_size})."
            )
        smallest_side = 2 * max(self.min_object_size, MIN_OBJECT_SIZE)
        if not smallest_side <= self.min_side <= self.max_side:
            raise DataError(
                f"demo image sides must satisfy {smallest_side} <= min_side ({self.min_side}) <= "
                f"max_side ({self.max_side})."
            )
        if self.max_objects is not None and self.max_objects < 1:
            raise DataError(f"demo max_objects must be at least 1 (got {self.max_objects}).")


def _saturated_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return int(red * 255), int(green * 255), int(blue * 255)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A muted, tinted gradient with noise, faint blurred blobs and a few thin lines."""
    tint = rng.uniform(70, 190) + rng.uniform(-25, 25, size=3)
    ramp = np.linspace(-1.0, 1.0, width)[None, :, None] * rng.uniform(-30, 30, size=3)
    ramp = ramp + np.linspace(-1.0, 1.0, height)[:, None, None] * rng.uniform(-30, 30, size=3)
    pixels = tint + ramp + rng.normal(0, 10, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    blobs = Image.new("RGB", (width, height))
    blob_mask = Image.new("L", (width, height), 0)
    draw_blobs, draw_mask = ImageDraw.Draw(blobs), ImageDraw.Draw(blob_mask)
    for _ in range(rng.integers(2, 6)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(8, 35), rng.uniform(8, 35)
        colour = tuple(int(c) for c in np.clip(tint + rng.uniform(-35, 35, size=3), 0, 255))
        draw_blobs.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)
        draw_mask.ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(rng.integers(60, 140)))
    image.paste(blobs.filter(ImageFilter.GaussianBlur(4)), mask=blob_mask.filter(ImageFilter.GaussianBlur(4)))

    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 8)):
        start = (rng.uniform(0, width), rng.uniform(0, height))
        end = (rng.uniform(0, width), rng.uniform(0, height))
        colour = tuple(int(c) for c in np.clip(tint + rng.uniform(-70, 70, size=3), 0, 255))
        draw.line((start, end), fill=colour, width=int(rng.integers(1, 3)))
    return image


def _free_box(rng: np.random.Generator, width: int, height: int, size: int, taken: list[Box]) -> Box | None:
    """A ``size`` x ``size`` box inside the image not touching ``taken`` boxes, or None."""
    for _ in range(50):
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        clear = all(
            x + size + 2 <= tx or tx + tw + 2 <= x or y + size + 2 <= ty or ty + th + 2 <= y
            for tx, ty, tw, th in taken
        )
        if clear:
            return x, y, size, size
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, category_id: int, box: Box, colour: tuple) -> None:
    """Draw a shape whose tight bounding box is exactly ``box``."""
    x, y, w, h = box
    corners = (x, y, x + w - 1, y + h - 1)  # PIL includes the last row/column
    if category_id == SQUARE:
        draw.rectangle(corners, fill=colour)
    elif category_id == DISC:
        draw.ellipse(corners, fill=colour)
    else:
        draw.polygon([(x, y + h - 1), (x + w - 1, y + h - 1), (x + (w - 1) / 2, y)], fill=colour)


def _draw_crowd(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> Box:
    """A cluster of tiny discs in one region; returns the region's tight box."""
    region = int(rng.integers(36, 56))
    x0, y0 = int(rng.integers(0, width - region + 1)), int(rng.integers(0, height - region + 1))
    colour = _saturated_colour(rng)
    left, top, right, bottom = x0 + region, y0 + region, x0, y0
    for _ in range(rng.integers(6, 11)):
        diameter = int(rng.integers(5, 9))
        x = int(rng.integers(x0, x0 + region - diameter + 1))
        y = int(rng.integers(y0, y0 + region - diameter + 1))
        draw.ellipse((x, y, x + diameter - 1, y + diameter - 1), fill=colour)
        left, top = min(left, x), min(top, y)
        right, bottom = max(right, x + diameter), max(bottom, y + diameter)
    return left, top, right - left, bottom - top


def render_demo_image(
    seed: int, split: str, index: int, shapes: DemoShapes
) -> tuple[Image.Image, list[tuple[int, Box, int]]]:
    """Draw image ``index`` of ``split``; returns it and its objects ``(category_id, box, iscrowd)``."""
    rng = np.random.default_rng([seed, list(DEMO_SPLIT_FOLDERS).index(split), index])
    width, height = (int(side) for side in rng.integers(shapes.min_side, shapes.max_side + 1, size=2))
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    objects: list[tuple[int, Box, int]] = []
    taken: list[Box] = []

    if index == CROWD_IMAGE_INDEX and split in ("train", "val"):
        taken.append(_draw_crowd(rng, draw, width, height))
        objects.append((DISC, taken[-1], 1))
    if index == EMPTY_IMAGE_INDEX:
        count = 0
    elif shapes.max_objects is None:
        count = int(rng.choice(len(OBJECT_COUNT_PROBABILITIES), p=OBJECT_COUNT_PROBABILITIES))
    else:
        count = int(rng.integers(1, shapes.max_objects + 1))
    largest = min(shapes.max_object_size, int(0.6 * min(width, height)))
    for _ in range(count):
        category_id = int(rng.choice([SQUARE, DISC, TRIANGLE]))
        size = int(rng.integers(shapes.min_object_size, largest + 1))
        box = _free_box(rng, width, height, size, taken)
        if box is None:
            continue
        _draw_shape(draw, category_id, box, _saturated_colour(rng))
        taken.append(box)
        objects.append((category_id, box, 0))

    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 4, size=(height, width, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if split == "train" and index == GRAYSCALE_IMAGE_INDEX:
        image = image.convert("L")
    return image, objects


def _write_demo_image(
    out_dir: Path, split: str, index: int, seed: int, shapes: DemoShapes
) -> tuple[dict[str, Any], list[tuple[int, Box, int]]]:
    """Draw and save image ``index`` of ``split``; returns its COCO image record and its objects."""
    image, objects = render_demo_image(seed, split, index, shapes)
    file_name = f"{DEMO_SPLIT_FOLDERS[split]}_{index:04d}.jpg"
    image.save(out_dir / file_name, quality=92)
    record = {"id": index, "license": 1, "file_name": file_name, "height": image.height, "width": image.width}
    return record, objects


def write_demo_split(
    out_dir: Path, split: str, num_images: int, seed: int, processes: int = 1, **shapes: Any
) -> None:
    """Write one split's JPEGs and ``_annotations.coco.json`` (Roboflow style, `DemoShapes` ``shapes``).

    ``processes`` > 1 draws the images in that many processes; the files are the same bytes."""
    demo_shapes = DemoShapes(**shapes)
    out_dir.mkdir(parents=True, exist_ok=True)
    arguments = [(out_dir, split, index, seed, demo_shapes) for index in range(num_images)]
    if processes > 1 and num_images > 1:
        context = multiprocessing.get_context("spawn")  # safe whatever threads the caller runs
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            drawn = list(pool.map(_write_demo_image, *zip(*arguments, strict=True), chunksize=4))
    else:
        drawn = [_write_demo_image(*item) for item in arguments]
    annotations = []
    for image_id, (_, objects) in enumerate(drawn):
        for category_id, (x, y, w, h), iscrowd in objects:
            ids = {"id": len(annotations), "image_id": image_id, "category_id": category_id}
            annotations.append(
                {**ids, "bbox": [x, y, w, h], "area": w * h, "segmentation": [], "iscrowd": iscrowd}
            )
    coco = {
        "info": {"description": "detr-lightning synthetic shapes demo", "version": "1"},
        "licenses": [
            {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "categories": DEMO_CATEGORIES,
        "images": [record for record, _ in drawn],
        "annotations": annotations,
    }
    (out_dir / ROBOFLOW_ANNOTATION_NAME).write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")


def write_demo_dataset(
    out: Path,
    num_train: int = 300,
    num_val: int = 50,
    num_test: int = 50,
    seed: int = 0,
    processes: int = 1,
    **shapes: Any,
) -> None:
    """Write the demo dataset into ``out`` (``train/``, ``valid/``, ``test/``), overwriting files there;
    ``shapes`` are `DemoShapes` fields (`CROWDED_DEMO_OPTIONS` for the harder variant,
    `REALISTIC_DEMO_OPTIONS` for COCO-like sizes), checked first; ``processes`` draw the images."""
    DemoShapes(**shapes)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if num_train < 1 or min(num_val, num_test) < 0:
        raise DataError(f"demo split sizes must be 1 or more train, 0 or more val and test images: {counts}.")
    for split, num_images in counts.items():
        write_demo_split(out / DEMO_SPLIT_FOLDERS[split], split, num_images, seed, processes, **shapes)


def is_demo_dataset_complete(path: Path) -> bool:
    """Whether ``path`` holds all three split annotation files."""
    return all((path / folder / ROBOFLOW_ANNOTATION_NAME).is_file() for folder in DEMO_SPLIT_FOLDERS.values())


def ensure_demo_dataset(path: str | Path, **options: Any) -> Path:
    """Write the demo dataset (`write_demo_dataset` ``options``) to ``path`` unless one is there; returns
    ``path``. It is written into a temporary sibling folder and renamed into place, so an interrupted run
    never leaves half a dataset and concurrent callers (several ranks) are safe."""
    path = Path(path).expanduser()
    if is_demo_dataset_complete(path):
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataError(
            f"{path} exists but holds no complete dataset, so the demo dataset is not written there. "
            "Fix: remove it, or point data.root at another folder."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        write_demo_dataset(staging, **options)
        staging.chmod(0o755)
        try:
            staging.rename(path)
        except OSError:
            if not is_demo_dataset_complete(path):  # another process may have won the race
                raise
        else:
            log.info("data: wrote the demo dataset to %s", path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m detr_lightning.data.demo", description="Write the synthetic shapes demo dataset."
    )
    parser.add_argument(
        "out", type=Path, help="output folder (Roboflow layout); left alone if it has the dataset"
    )
    for name, default in [("num-train", 300), ("num-val", 50), ("num-test", 50), ("seed", 0)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--min-side", type=int, default=DemoShapes.min_side)
    parser.add_argument("--max-side", type=int, default=DemoShapes.max_side)
    variant = parser.add_mutually_exclusive_group()
    for name, (what, shapes) in DEMO_VARIANTS.items():
        images = f"{shapes['min_side']}-{shapes['max_side']} px images with 1-{shapes['max_objects']} shapes"
        objects = f"of {shapes['min_object_size']}-{shapes['max_object_size']} px (--min/max-side ignored)"
        variant.add_argument(
            f"--{name}", dest="shapes", action="store_const", const=shapes, help=f"{what}: {images} {objects}"
        )
    parser.add_argument("--processes", type=int, default=1, help="draw the images in N processes")
    args = parser.parse_args(argv)
    if is_demo_dataset_complete(args.out):
        print(f"{args.out} already holds a dataset; nothing written (delete it to regenerate)")
        return 0
    shapes = args.shapes or {"min_side": args.min_side, "max_side": args.max_side}
    counts = {"num_train": args.num_train, "num_val": args.num_val, "num_test": args.num_test}
    try:
        ensure_demo_dataset(args.out, seed=args.seed, processes=args.processes, **counts, **shapes)
    except DataError as err:
        print(f"demo dataset not written: {err}", file=sys.stderr)
        return 2
    written = f"{args.num_train} train, {args.num_val} valid, {args.num_test} test"
    print(f"wrote the demo dataset to {args.out} ({written})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
