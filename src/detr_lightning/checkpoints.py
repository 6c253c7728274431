"""Official DETR checkpoints: names and URLs, downloads, safe loading, and rebuilding the model.

Weight files are always read with ``torch.load(weights_only=True)``: only tensors, containers and the
one class official files carry (``argparse.Namespace``) are accepted, so a file cannot run code.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import socket
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from detr_lightning.models.detr import DETR, build_detr

log = logging.getLogger(__name__)

#: The four official COCO detection models (facebookresearch/detr, 500-epoch schedule).
OFFICIAL_DETR_URLS = {
    "detr_r50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_r50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_r101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_r101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
}

#: Classes a weight file may contain besides tensors and plain containers.
ALLOWED_PICKLE_CLASSES = [argparse.Namespace]

#: Key under which this project's Lightning checkpoints store the model's :func:`build_detr` arguments.
ARCHITECTURE_KEY = "detr_architecture"

#: Set to 1 to never try the network (a missing file is reported at once).
OFFLINE_ENV = "DETR_LIGHTNING_OFFLINE"

DOWNLOAD_TIMEOUT_S = 30.0


class CheckpointError(RuntimeError):
    """A weight file that cannot be used: unreadable, unsafe, or not matching the model."""


class WeightsUnavailableError(CheckpointError):
    """Weights that are neither on disk nor downloadable (typically: no network)."""


def hub_checkpoint_path(url: str) -> Path:
    """Where torch hub keeps the download of ``url``: ``<torch hub dir>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def download_weights(url: str) -> Path:
    """Return the cached file of ``url``, downloading it into the torch hub cache when missing.

    The 8 hex digits before ``.pth`` in official file names are the SHA-256 prefix and are checked.
    Offline (or with ``DETR_LIGHTNING_OFFLINE=1``) this fails fast with a message naming the URL and
    where to put the file by hand.
    """
    destination = hub_checkpoint_path(url)
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
    except (urllib.error.URLError, OSError, TimeoutError) as error:
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


def extract_state_dict(checkpoint: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, Tensor]:
    """The model weights of an official file (``["model"]``), a Lightning checkpoint of this project
    (``["state_dict"]`` with keys ``model.*``) or a bare state dict."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict of weights.")
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        return dict(checkpoint["model"])
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{path} is a Lightning checkpoint without 'model.*' weights.")
        return state
    if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointError(f"{path} has no 'model' or 'state_dict' entry (keys: {sorted(checkpoint)[:10]}).")


def _layer_count(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_architecture(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Read every :func:`build_detr` argument that tensor shapes determine.

    ``nheads``, ``dilation``, ``dropout`` and ``activation`` leave no trace in shapes and are not returned.
    """
    body = "backbone.0.body."
    if f"{body}conv1.weight" not in state_dict or "query_embed.weight" not in state_dict:
        raise CheckpointError("these weights are not a DETR model (no backbone.0.body.conv1 / query_embed)")
    bottleneck = f"{body}layer1.0.conv3.weight" in state_dict
    layer3_blocks = _layer_count(state_dict, f"{body}layer3.")
    resnets = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
    if (bottleneck, layer3_blocks) not in resnets:
        raise CheckpointError(
            f"unsupported backbone: layer3 has {layer3_blocks} blocks (bottleneck={bottleneck})"
        )
    enc_layers = _layer_count(state_dict, "transformer.encoder.layers.")
    dec_layers = _layer_count(state_dict, "transformer.decoder.layers.")
    ffn_key = "transformer.decoder.layers.0.linear1.weight"
    num_queries, hidden_dim = state_dict["query_embed.weight"].shape
    extra_group_queries = (
        state_dict["query_embed_groups"].shape[0] if "query_embed_groups" in state_dict else 0
    )
    return {
        "num_groups": 1 + extra_group_queries // int(num_queries),
        "backbone": resnets[(bottleneck, layer3_blocks)],
        "num_classes": state_dict["class_embed.weight"].shape[0] - 1,
        "num_queries": int(num_queries),
        "hidden_dim": int(hidden_dim),
        "enc_layers": enc_layers,
        "dec_layers": dec_layers,
        "dim_feedforward": int(state_dict[ffn_key].shape[0]),
        "pre_norm": "transformer.encoder.norm.weight" in state_dict,
        "backbone_norm": "batch" if any(k.endswith("num_batches_tracked") for k in state_dict) else "frozen",
        "backbone_output_stage": "layer4"
        if any(k.startswith(f"{body}layer4.") for k in state_dict)
        else "layer3",
        "position_embedding": "learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        "spatial_prior": "gaussian" if "spatial_prior.anchor_logits" in state_dict else "none",
    }


def _architecture_hints(checkpoint: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Arguments shapes cannot tell, from the file's ``args`` / saved architecture, or the model name."""
    hints: dict[str, Any] = {}
    saved = checkpoint.get(ARCHITECTURE_KEY)
    if isinstance(saved, Mapping):
        hints.update({k: saved[k] for k in ("nheads", "dilation", "dropout", "activation") if k in saved})
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        hints.update({k: getattr(args, k) for k in ("nheads", "dilation", "dropout") if hasattr(args, k)})
    if "dilation" not in hints and str(source) in OFFICIAL_DETR_URLS:
        hints["dilation"] = str(source).endswith("_dc5")
    return hints


def _check_keys(model: DETR, state_dict: Mapping[str, Tensor], ignored: set[str], path: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict) - ignored)
    unexpected = sorted(set(state_dict) - set(expected) - ignored)
    mismatched = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict) - ignored
        if state_dict[k].shape != expected[k].shape
    )
    problems = []
    for title, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise CheckpointError(f"{path} does not fit the DETR it describes; " + "; ".join(problems))


def load_official_detr(
    path_or_url: str | os.PathLike,
    num_classes: int | None = None,
    *,
    nheads: int | None = None,
    dilation: bool | None = None,
    aux_loss: bool = True,
    **overrides: Any,
) -> DETR:
    """Build the DETR a checkpoint needs and load it strictly.

    Args:
        path_or_url: an official name (``detr_r50``, ``detr_r50_dc5``, ``detr_r101``, ``detr_r101_dc5``),
            a URL (downloaded to the torch hub cache) or a local file: an official ``.pth``, a bare state
            dict, or a Lightning checkpoint of this project.
        num_classes: when it differs from the checkpoint's, the class head is re-initialised (the usual
            fine-tuning recipe) and everything else is loaded.
        nheads, dilation: for files that do not say (official files carry them in ``args``; defaults 8 and
            False, or from the official name). A value contradicting the file is an error.
        aux_loss: whether the model returns aux outputs (does not change the weights).
        overrides: further :func:`build_detr` arguments that weights do not fix (``dropout``,
            ``activation``, ``train_backbone``).

    Raises:
        CheckpointError: unreadable or unsafe file, or any missing/unexpected/mis-shaped key.
        WeightsUnavailableError: a name or URL that cannot be downloaded.
    """
    path = resolve_weights(path_or_url)
    checkpoint = load_weights_file(path)
    state_dict = extract_state_dict(checkpoint, path)
    architecture = infer_architecture(state_dict)
    hints = _architecture_hints(checkpoint, str(path_or_url))
    for name, given in (("nheads", nheads), ("dilation", dilation)):
        if given is None:
            continue
        if name in hints and hints[name] != given:
            raise CheckpointError(f"{path} was trained with {name}={hints[name]!r}, not {given!r}")
        hints[name] = given
    architecture.update(hints)
    architecture.update(overrides)
    checkpoint_classes = architecture["num_classes"]
    if num_classes is not None:
        architecture["num_classes"] = num_classes
    model = build_detr(aux_loss=aux_loss, **architecture)
    ignored: set[str] = set()
    if num_classes is not None and num_classes != checkpoint_classes:
        ignored = {"class_embed.weight", "class_embed.bias"}
        state_dict = {k: v for k, v in state_dict.items() if k not in ignored}
        log.info(
            "Re-initialised the class head for num_classes=%d (%s has %d); all other weights loaded.",
            num_classes,
            path.name,
            checkpoint_classes,
        )
    _check_keys(model, state_dict, ignored, str(path))
    model.load_state_dict(state_dict, strict=not ignored)
    return model


def fetch_torchvision_weights(weights: Any) -> dict[str, Tensor]:
    """State dict of a torchvision ``WeightsEnum`` (e.g. ImageNet ResNet-50), via the torch hub cache."""
    return load_weights_file(download_weights(weights.url))
