"""Weight files: the official DETR URLs, downloads into the torch hub cache, and safe loading.

Every file is read with ``torch.load(weights_only=True)``: only tensors, containers and the one class
official DETR files carry (``argparse.Namespace``) are accepted, so a file cannot run code.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

#: The four official COCO detection models (facebookresearch/detr, 500-epoch schedule).
OFFICIAL_DETR_URLS = {
    "detr_r50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_r50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_r101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_r101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
}

#: Classes a weight file may contain besides tensors and plain containers.
ALLOWED_PICKLE_CLASSES = [argparse.Namespace]

#: Set to 1 to never try the network (a missing file is reported at once).
OFFLINE_ENV = "DETR_LIGHTNING_OFFLINE"

DOWNLOAD_TIMEOUT_S = 30.0


class CheckpointError(RuntimeError):
    """A weight file that cannot be used: unreadable, unsafe, or not matching the model."""


class WeightsUnavailableError(CheckpointError):
    """Weights that are neither on disk nor downloadable (typically: no network)."""


def download_weights(url: str) -> Path:
    """The file of ``url`` in the torch hub cache (``<hub dir>/checkpoints/<name>``), downloaded if missing.

    The 8 hex digits before ``.pth`` in official file names are the SHA-256 prefix and are checked.
    Offline (or with ``DETR_LIGHTNING_OFFLINE=1``) this fails fast with a message naming the URL and
    where to put the file by hand.
    """
    destination = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if destination.is_file():
        return destination
    how_to_fix = (
        f"Download {url} on a machine with internet access and copy it to {destination} "
        "(or pass the local file path instead)."
    )
    if os.environ.get(OFFLINE_ENV) == "1":
        raise WeightsUnavailableError(
            f"{destination} is missing and {OFFLINE_ENV}=1 forbids downloads. {how_to_fix}"
        )
    match = re.search(r"-([0-9a-f]{8,})\.\w+$", destination.name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=match.group(1) if match else None)
    except OSError as error:  # URLError and socket timeouts included
        reason = getattr(error, "reason", error)
        raise WeightsUnavailableError(f"Could not download {url} ({reason}). {how_to_fix}") from None
    except RuntimeError as error:  # hash mismatch
        raise WeightsUnavailableError(
            f"Download of {url} is corrupt ({error}). Delete it and retry."
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return destination


def resolve_weights(source: str | os.PathLike) -> Path:
    """Turn an official model name, a URL or a path into a local file (downloading when needed)."""
    text = str(source)
    if text in OFFICIAL_DETR_URLS:
        return download_weights(OFFICIAL_DETR_URLS[text])
    if text.startswith(("http://", "https://")):
        return download_weights(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"Weight file {path} does not exist. Give an existing path, a URL, or one of the official "
            f"names {sorted(OFFICIAL_DETR_URLS)}."
        )
    return path


def load_weights_file(path: str | os.PathLike) -> Any:
    """``torch.load`` a file safely (``weights_only=True``, only ``argparse.Namespace`` allowed), on CPU."""
    try:
        with torch.serialization.safe_globals(ALLOWED_PICKLE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's message: a generic first line, then the reason ("... unsupported GLOBAL posix.system ...").
        detail = next(
            (line for line in lines if "GLOBAL" in line), lines[0] if lines else type(error).__name__
        )
        raise CheckpointError(
            f"Refusing to load {path}: it contains pickled objects other than tensors and containers "
            f"(allowed classes: {[c.__qualname__ for c in ALLOWED_PICKLE_CLASSES]}), which could run code. "
            f"Loader said: {detail}. "
            "Re-save only the state dict: torch.save({'model': model.state_dict()}, path)."
        ) from None
    except Exception as error:  # torch.load raises many types on corrupt or foreign files
        raise CheckpointError(
            f"{path} is not a readable PyTorch weight file ({type(error).__name__}: {error})."
        ) from None


def fetch_torchvision_weights(weights: Any) -> dict[str, Tensor]:
    """State dict of a torchvision ``WeightsEnum`` (e.g. ImageNet ResNet-50), via the torch hub cache."""
    return load_weights_file(download_weights(weights.url))
