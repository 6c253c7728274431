"""Image files: decoding to RGB tensors, and cheap header checks against the annotation records.

EXIF orientation. Decoding applies the EXIF orientation tag (phone photos are stored sideways), so the
record's ``width``/``height`` must normally be the *displayed* size. Some datasets (COCO itself among
them) were annotated on the stored pixels instead; an image whose record matches only the stored size of
a 90°-rotated file is therefore read without rotation, and the check counts such images.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from detr_lightning.data.annotations import more_like_it
from detr_lightning.data.errors import DataError

# What torchvision.io.decode_image reads; EXIF orientation is only applied for JPEG and PNG.
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP"})
ORIENTED_FORMATS = frozenset({"JPEG", "PNG"})
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # transpose and 90° rotations


@dataclass(frozen=True)
class ImageHeader:
    """Format and ``(width, height)`` of an image file, as stored and as displayed (after its EXIF
    orientation), read from its header without decoding the pixels."""

    format: str
    stored_size: tuple[int, int]
    displayed_size: tuple[int, int]


def read_image_header(path: Path) -> ImageHeader:
    """Header of ``path``; raises `OSError`/`UnidentifiedImageError` if it is missing or not an image."""
    with Image.open(path) as image:
        exif = Image.Exif()
        if image.info.get("exif"):
            exif.load(image.info["exif"])
        orientation = int(exif.get(ExifTags.Base.Orientation, 1))
        swapped = orientation in SWAPPING_ORIENTATIONS and image.format in ORIENTED_FORMATS
        return ImageHeader(str(image.format), image.size, image.size[::-1] if swapped else image.size)


def read_image_rgb(path: Path, apply_exif_orientation: bool = True) -> Tensor:
    """Decode a JPEG/PNG/GIF/WEBP file to a ``(3, H, W)`` uint8 RGB tensor.

    Grayscale, alpha and palette images become RGB (alpha dropped), 16-bit PNGs 8-bit, and animated GIFs
    their first frame.
    """
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work.
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=apply_exif_orientation)
    if image.ndim == 4:  # an animated GIF: (frames, 3, H, W); use the first frame
        image = image[0]
    if image.dtype != torch.uint8:
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def image_header_or_error(path: Path) -> ImageHeader | Exception:
    """The header of ``path``, or the error that reading it raised (missing file, not an image)."""
    try:
        return read_image_header(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return err


def escapes_folder(path: Path, folder: Path) -> bool:
    """Whether ``path``, links followed, lies outside ``folder``: links inside the image folder that point
    elsewhere (``/etc/passwd``); ``..`` and absolute file names are refused when the file is read."""
    return not path.resolve().is_relative_to(folder.resolve())


#: The problems `verify_image_files` reports, in this order: kind -> (what, the fix).
IMAGE_PROBLEMS = {
    "outside": (
        "image path leaves the image folder",
        "copy the file into {img_dir} (links must stay inside it) or set the split's img_dir to the folder "
        "that holds it",
    ),
    "missing": ("image file not found", "put the image there or correct its file_name in {ann_file}"),
    "undecodable": ("image file cannot be decoded", "replace the file or remove its record and annotations"),
    "format": ("unsupported image format", "convert it to JPEG or PNG (decodable: {formats})"),
    "size": ("image size differs from its record", "correct width/height in {ann_file} or re-export"),
}


def verify_image_files(images: Iterable[dict[str, Any]], img_dir: Path, ann_file: Path) -> frozenset[int]:
    """Check from the file headers that every image record has a decodable file of the recorded size.

    Raises a `DataError` for the first kind of `IMAGE_PROBLEMS` found, naming its first image. Returns the
    ids of images whose record matches only the stored (unrotated) size: they are read without rotation.
    """
    records = list(images)
    paths = [img_dir / record["file_name"] for record in records]
    with ThreadPoolExecutor(max_workers=8) as pool:
        headers = list(pool.map(image_header_or_error, paths))
        outside = list(pool.map(lambda path: escapes_folder(path, img_dir), paths))

    found: dict[str, list[str]] = {kind: [] for kind in IMAGE_PROBLEMS}
    read_unrotated = set()
    for record, path, header, leaves in zip(records, paths, headers, outside, strict=True):
        where, recorded = f"{path} (image id {record['id']})", (record["width"], record["height"])
        if leaves:
            found["outside"].append(f"{where} is a link to {path.resolve()}")
        elif isinstance(header, FileNotFoundError) or (isinstance(header, Exception) and not path.exists()):
            found["missing"].append(where)
        elif isinstance(header, Exception):
            found["undecodable"].append(f"{where}: {type(header).__name__}: {header}")
        elif header.format not in DECODABLE_FORMATS:
            found["format"].append(f"{where} is {header.format}")
        elif recorded == header.stored_size and recorded != header.displayed_size:
            read_unrotated.add(record["id"])
        elif recorded != header.displayed_size:
            width, height = header.displayed_size
            found["size"].append(
                f"{where} is {width}x{height} (width x height) but its record says "
                f"{record['width']}x{record['height']}"
            )
    for kind, (what, fix) in IMAGE_PROBLEMS.items():
        if found[kind]:
            fix = fix.format(img_dir=img_dir, ann_file=ann_file, formats=sorted(DECODABLE_FORMATS))
            raise DataError(f"{ann_file}: {what}: {found[kind][0]}{more_like_it(found[kind])}. Fix: {fix}.")
    return frozenset(read_unrotated)
