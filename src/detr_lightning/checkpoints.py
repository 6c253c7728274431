"""One way from a weight file (official ``.pth``, Lightning checkpoint of this project, bare state dict,
URL or official name, Hugging Face folder or hub id) to a ready DETR.

The architecture comes from the file: a checkpoint of this project holds its :func:`build_detr` arguments
(``hyper_parameters["model"]``); a Hugging Face DETR has its ``config.json`` (:mod:`.hf_format`); other
files are read from their tensor shapes, completed by the ``args`` official files carry and by the
official name. Reading is always safe (``weights_only``, or ``safetensors``).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from detr_lightning.hf_format import is_hf_source, read_hf_checkpoint, shown_names
from detr_lightning.models.criterion import class_score
from detr_lightning.models.detr import DETR, build_detr
from detr_lightning.models.weight_files import (
    OFFICIAL_DETR_URLS,
    CheckpointError,
    load_weights_file,
    resolve_weights,
)

log = logging.getLogger(__name__)

_BUILD_ARGUMENTS = set(inspect.signature(build_detr).parameters)


def extract_state_dict(checkpoint: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, Tensor]:
    """The model weights of an official file (``["model"]``), a Lightning checkpoint of this project
    (``["state_dict"]`` with keys ``model.*``) or a bare state dict."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict of weights.")
    if isinstance(checkpoint.get("model"), Mapping):
        return dict(checkpoint["model"])
    if isinstance(checkpoint.get("state_dict"), Mapping):
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
    """Every :func:`build_detr` argument that tensor shapes determine (not ``nheads``, ``dilation``,
    ``dropout`` or ``activation``, which leave no trace in them)."""
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
    num_queries, hidden_dim = state_dict["query_embed.weight"].shape
    extra_group_queries = len(state_dict.get("query_embed_groups", ()))  # (Q * (num_groups - 1), D)
    return {
        "num_groups": 1 + extra_group_queries // int(num_queries),
        "backbone": resnets[(bottleneck, layer3_blocks)],
        "num_classes": state_dict["class_embed.weight"].shape[0] - 1,
        "num_queries": int(num_queries),
        "hidden_dim": int(hidden_dim),
        "enc_layers": _layer_count(state_dict, "transformer.encoder.layers."),
        "dec_layers": _layer_count(state_dict, "transformer.decoder.layers."),
        "dim_feedforward": int(state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0]),
        "pre_norm": "transformer.encoder.norm.weight" in state_dict,
        "backbone_norm": "batch" if any(k.endswith("num_batches_tracked") for k in state_dict) else "frozen",
        "backbone_output_stage": "layer4" if _layer_count(state_dict, f"{body}layer4.") else "layer3",
        "position_embedding": "learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        "spatial_prior": "gaussian" if "spatial_prior.anchor_logits" in state_dict else "none",
    }


def _official_hints(contents: Mapping[str, Any], source: str) -> dict[str, Any]:
    """What shapes cannot tell, from an official file's ``args`` or the official model name."""
    args = vars(contents["args"]) if isinstance(contents.get("args"), argparse.Namespace) else {}
    hints = {k: args[k] for k in ("nheads", "dilation", "dropout") if k in args}
    if "dilation" not in hints and source in OFFICIAL_DETR_URLS:
        hints["dilation"] = source.endswith("_dc5")
    return hints


def _saved_section(contents: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """``contents[key][key2]...`` of a weight file as a dict; empty where a level is missing."""
    for key in keys:
        contents = contents.get(key) or {}
    return dict(contents)


@dataclass(frozen=True)
class DETRFile:
    """A weight file read safely, with the DETR it holds."""

    source: str  # as given: official name, URL, path or hub id
    path: Path  # the local file (a Hugging Face DETR: its folder)
    # The whole loaded file (hyper_parameters, class_names, official args ...); of a Hugging Face DETR: its
    # config (config.json), class_names (of id2label) and preprocessing (scale, max_size, mean and std of
    # preprocessor_config.json).
    contents: Mapping[str, Any]
    state_dict: dict[str, Tensor]  # the DETR weights (keys as in DETR)
    architecture: dict[str, Any]  # the build_detr arguments of those weights

    @property
    def hyper_parameters(self) -> dict[str, Any]:
        """The LightningModule arguments of a checkpoint of this project (empty for other files)."""
        return _saved_section(self.contents, "hyper_parameters")


def saved_scoring(contents: Mapping[str, Any]) -> tuple[str, int | None]:
    """``(score, top_k)`` of a weight file's contents: ``softmax`` or ``sigmoid`` (how its class logits
    are read, from the saved ``loss.class_loss``) and its saved ``postprocess.top_k``. Official files and
    checkpoints from before the option: ``("softmax", None)``."""
    try:
        score = class_score(_saved_section(contents, "hyper_parameters", "loss").get("class_loss") or "ce")
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return score, _saved_section(contents, "hyper_parameters", "postprocess").get("top_k")


def read_detr_file(
    source: str | os.PathLike, *, nheads: int | None = None, dilation: bool | None = None
) -> DETRFile:
    """Read ``source`` (official name, URL, file, Hugging Face folder or hub id) and work out its
    architecture. ``nheads`` and ``dilation`` fill in what a bare state dict cannot say (defaults 8 and
    False); a value contradicting the file is a :class:`CheckpointError`."""
    if is_hf_source(source):  # config.json says everything
        path, contents, state_dict, architecture = read_hf_checkpoint(source)
        known = dict(architecture)
    else:
        path = resolve_weights(source)
        contents = load_weights_file(path)
        state_dict = extract_state_dict(contents, path)
        architecture, known = _file_architecture(contents, state_dict, path, str(source))
    for name, given in (("nheads", nheads), ("dilation", dilation)):
        if given is None:
            continue
        if name in known and known[name] != given:
            raise CheckpointError(f"{path} was trained with {name}={known[name]!r}, not {given!r}")
        architecture[name] = given
    architecture["pretrained_backbone"] = False  # the file holds the backbone's weights
    return DETRFile(str(source), path, contents, state_dict, architecture)


def read_project_checkpoint(path: Path) -> DETRFile:
    """A Lightning checkpoint of this project (``ckpt_path`` of eval and predict), read.

    Raises:
        CheckpointError: a missing file, or weights without this project's settings (official weights).
    """
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={path} does not exist. Fix: point it at a run's checkpoints/best.ckpt "
            "(or use model.pretrained=detr_r50 for the official COCO model)."
        )
    file = read_detr_file(path)
    if not file.hyper_parameters:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of this project. Fix: for official DETR weights use "
            "model.pretrained=PATH instead of ckpt_path."
        )
    return file


def _file_architecture(
    contents: Mapping[str, Any], state_dict: Mapping[str, Tensor], path: Path, source: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The architecture of a ``torch.load``-ed file, and the part of it the file states (not inferred)."""
    saved_model = _saved_section(contents, "hyper_parameters", "model")
    if saved_model:  # a checkpoint of this project says everything
        architecture = {k: v for k, v in saved_model.items() if k in _BUILD_ARGUMENTS}
        return architecture, architecture
    try:
        architecture = infer_architecture(state_dict)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    known = _official_hints(contents, source)
    return {**architecture, **known}, known


def _check_keys(model: DETR, state_dict: Mapping[str, Tensor], ignored: set[str], path: Path) -> None:
    expected = model.state_dict()
    problems = {
        "missing": sorted(set(expected) - set(state_dict) - ignored),
        "unexpected": sorted(set(state_dict) - set(expected) - ignored),
        "shape mismatch": sorted(
            f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(expected) & set(state_dict) - ignored
            if state_dict[k].shape != expected[k].shape
        ),
    }
    listed = [f"{title}: {shown_names(names)}" for title, names in problems.items() if names]
    if listed:
        raise CheckpointError(f"{path} does not fit the DETR it describes; " + "; ".join(listed))


def build_from_file(
    file: DETRFile, num_classes: int | None = None, *, aux_loss: bool = True, **overrides: Any
) -> DETR:
    """The DETR of ``file`` with its weights loaded strictly; for another ``num_classes`` than the file's,
    all but the class head, which is re-initialised (the usual fine-tuning recipe). ``aux_loss`` and
    ``overrides`` (:func:`build_detr` arguments that weights do not fix: ``dropout``, ``train_backbone``
    ...) leave the weights as they are."""
    file_classes = int(file.state_dict["class_embed.weight"].shape[0]) - 1
    num_classes = file_classes if num_classes is None else num_classes
    model = build_detr(**{**file.architecture, **overrides, "aux_loss": aux_loss, "num_classes": num_classes})
    state_dict, ignored = file.state_dict, set()
    if num_classes != file_classes:
        ignored = {"class_embed.weight", "class_embed.bias"}
        state_dict = {k: v for k, v in state_dict.items() if k not in ignored}
        log.info(
            "Re-initialised the class head for num_classes=%d (%s has %d); all other weights loaded.",
            num_classes,
            file.path.name,
            file_classes,
        )
    _check_keys(model, state_dict, ignored, file.path)
    model.load_state_dict(state_dict, strict=not ignored)
    return model


def load_detr(
    source: str | os.PathLike,
    num_classes: int | None = None,
    *,
    nheads: int | None = None,
    dilation: bool | None = None,
    aux_loss: bool = True,
    **overrides: Any,
) -> DETR:
    """Build the DETR a weight file needs and load it strictly: :func:`read_detr_file` then
    :func:`build_from_file`.

    Args:
        source: an official name (``detr_r50``, ``detr_r50_dc5``, ``detr_r101``, ``detr_r101_dc5``), a URL
            (downloaded to the torch hub cache), a local file (an official ``.pth``, a bare state dict,
            or a Lightning checkpoint of this project), a Hugging Face DETR folder (``config.json`` +
            ``model.safetensors`` or ``pytorch_model.bin``) or a hub id (``facebook/detr-resnet-50``,
            through the Hugging Face hub cache).

    Raises:
        CheckpointError: unreadable or unsafe file, or any missing/unexpected/mis-shaped key.
        WeightsUnavailableError: a name, URL or hub id that cannot be downloaded.
    """
    file = read_detr_file(source, nheads=nheads, dilation=dilation)
    return build_from_file(file, num_classes, aux_loss=aux_loss, **overrides)
