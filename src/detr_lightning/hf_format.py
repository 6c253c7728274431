"""The Hugging Face ``transformers`` DETR format, both ways.

Reading (:func:`read_hf_checkpoint`, for :func:`detr_lightning.checkpoints.read_detr_file`): a folder
(``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``) or a hub id becomes our weights,
:func:`~detr_lightning.models.build_detr` arguments and class names; ``config.json`` fields are read,
ignored (transformers' training, metadata) or refused, and weights are converted key by key, strictly,
for timm's and transformers' own ResNet. Writing (:func:`write_hf_folder`): a folder that
``DetrForObjectDetection.from_pretrained`` and ``transformers.pipeline`` load. Reading needs
``safetensors`` only; hub ids need ``huggingface_hub``; writing needs ``transformers``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from detr_lightning.files import read_json
from detr_lightning.models.detr import DETR
from detr_lightning.models.weight_files import (
    OFFICIAL_DETR_URLS,
    OFFLINE_ENV,
    CheckpointError,
    WeightsUnavailableError,
    load_weights_file,
)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
#: The weight files of a folder, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: ``owner/name`` on the hub (a relative path that does not exist looks the same: errors say both).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".tar", ".json")
INSTALL_HINT = "pip install 'detr-lightning[huggingface]' (transformers and huggingface_hub)"
#: transformers' DETR processor needs a longer-side cap: "no cap" is written as this many times ``scale``.
NO_CAP_FACTOR = 1000
FLAVOURS = ("native", "timm")

# ------------------------------------------------------------------ config.json

#: ``config.json`` field -> (our :func:`build_detr` argument, transformers' ``DetrConfig`` default). The
#: encoder and decoder fields that share an argument must agree.
HF_FIELDS: dict[str, tuple[str, Any]] = {
    "d_model": ("hidden_dim", 256),
    "encoder_layers": ("enc_layers", 6),
    "decoder_layers": ("dec_layers", 6),
    "encoder_attention_heads": ("nheads", 8),
    "decoder_attention_heads": ("nheads", 8),
    "encoder_ffn_dim": ("dim_feedforward", 2048),
    "decoder_ffn_dim": ("dim_feedforward", 2048),
    "num_queries": ("num_queries", 100),
    "dropout": ("dropout", 0.1),
    "activation_function": ("activation", "relu"),
    "position_embedding_type": ("position_embedding", "sine"),
}
#: transformers' other names of a field (``attribute_map``, and ``num_hidden_layers`` of older versions).
HF_ALIASES = {
    "hidden_size": "d_model",
    "num_attention_heads": "encoder_attention_heads",
    "num_hidden_layers": "encoder_layers",
}
#: The other fields read.
HF_OTHER_FIELDS = frozenset(
    "num_labels num_channels use_timm_backbone backbone dilation backbone_config backbone_kwargs".split()
)
#: The values this DETR computes, of the fields that have a choice.
HF_CHOICES = {"activation_function": ("relu", "gelu"), "position_embedding_type": ("sine", "learned")}
#: DETR fields of transformers' own training and initialisation: no trace in the weights or in what the
#: model computes at inference (training here has its own settings: ``loss``, ``matcher``, ``model.dropout``).
HF_TRAINING_FIELDS = frozenset(
    """
    attention_dropout activation_dropout encoder_layerdrop decoder_layerdrop init_std init_xavier_std
    auxiliary_loss class_cost bbox_cost giou_cost mask_loss_coefficient dice_loss_coefficient
    bbox_loss_coefficient giou_loss_coefficient eos_coefficient use_pretrained_backbone
    max_position_embeddings scale_embedding classifier_dropout
    """.split()
)
#: Fields of every transformers config (metadata, output switches, old generation defaults).
HF_GENERIC_FIELDS = frozenset(
    """
    _name_or_path _commit_hash _attn_implementation _attn_implementation_autoset transformers_version
    dtype torch_dtype use_bfloat16 problem_type finetuning_task return_dict output_hidden_states
    output_attentions torchscript pruned_heads tie_word_embeddings chunk_size_feed_forward
    is_encoder_decoder is_decoder add_cross_attention cross_attention_hidden_size tie_encoder_decoder
    tokenizer_class prefix bos_token_id pad_token_id eos_token_id sep_token_id decoder_start_token_id
    task_specific_params tf_legacy_loss max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences
    output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens id2label label2id
    architectures model_type
    """.split()
)
#: The one value this DETR computes (and writes), of transformers' ResNet's other fields.
NATIVE_FIXED = {
    "embedding_size": 64,
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
#: ``backbone_config`` fields by its ``model_type``: timm's and transformers' ResNet's.
BACKBONE_FIELDS = {
    "timm_backbone": frozenset(
        "backbone output_stride out_indices out_features stage_names features_only num_channels in_chans "
        "use_pretrained_backbone freeze_batch_norm_2d".split()
    ),
    "resnet": frozenset(
        "layer_type depths hidden_sizes num_channels out_features out_indices stage_names".split()
    ).union(NATIVE_FIXED),
}
#: The timm ``backbone_kwargs`` read (transformers 4 configs without a ``backbone_config``).
TIMM_KWARGS = frozenset({"out_indices", "output_stride", "in_chans", "features_only"})
#: Our :func:`build_detr` arguments of which transformers' DETR has one value: (the value, why).
HF_FIXED = {
    "pre_norm": (False, "transformers' DETR is post-norm"),
    "backbone_output_stage": ("layer4", "transformers: layer4"),
    "spatial_prior": ("none", "not in transformers' DETR"),
}
#: Our backbone -> its transformers ``ResNetConfig`` fields.
NATIVE_RESNETS = {
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
    "resnet34": dict(layer_type="basic", depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512]),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
    "resnet101": dict(layer_type="bottleneck", depths=[3, 4, 23, 3], hidden_sizes=[256, 512, 1024, 2048]),
}


def shown_names(values: Sequence[str], limit: int = 12) -> str:
    """The first ``limit`` of ``values``, comma-separated, and how many there are in all when more."""
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _backbone_config(config: Mapping[str, Any], problems: list[str]) -> Any:
    """The ``backbone_config`` of a ``config.json``, made up from the other fields where it is missing:
    transformers 4's timm backbone by name, or else transformers' default ``ResNetConfig`` (ResNet-50)."""
    if (sub := config.get("backbone_config")) is not None:
        return sub
    if config.get("use_timm_backbone", True):
        kwargs = dict(config.get("backbone_kwargs") or {})
        if unknown := sorted(set(kwargs) - TIMM_KWARGS):
            problems.append(f"backbone_kwargs {unknown} (not read here)")
        return {
            "output_stride": 16 if config.get("dilation") else None,
            **kwargs,
            "backbone": config.get("backbone"),
            "model_type": "timm_backbone",
        }
    if config.get("backbone"):
        problems.append(f"backbone={config['backbone']!r} without backbone_config (give the ResNetConfig)")
    return {"model_type": "resnet"}


def _backbone(sub: Any, problems: list[str]) -> tuple[str, bool, str]:
    """``(our backbone, dilation, flavour)`` of a ``backbone_config``; what cannot be built goes to
    ``problems``."""
    kind = sub.get("model_type") if isinstance(sub, Mapping) else type(sub).__name__
    if kind not in BACKBONE_FIELDS:
        problems.append(f"backbone_config of model_type {kind!r} (only timm_backbone or resnet)")
        return "resnet50", False, "timm"
    if unknown := sorted(set(sub) - BACKBONE_FIELDS[kind] - HF_GENERIC_FIELDS):
        problems.append(f"backbone_config fields {unknown} (not read here)")
    if (channels := sub.get("num_channels", sub.get("in_chans", 3))) != 3:
        problems.append(f"num_channels={channels} (RGB only)")
    if kind == "resnet":  # transformers' ResNet cannot dilate; its config's `dilation` is unused there too
        # A field left out has transformers' default, ResNet-50's.
        layout = {field: sub.get(field, default) for field, default in NATIVE_RESNETS["resnet50"].items()}
        name = next((name for name, known in NATIVE_RESNETS.items() if known == layout), None)
        if name is None:
            shown = " ".join(f"{field}={value!r}" for field, value in layout.items())
            problems.append(f"ResNet {shown} (only ResNet-18/34/50/101)")
        problems.extend(
            f"backbone_config.{k}={sub[k]!r} (only {v!r})"
            for k, v in NATIVE_FIXED.items()
            if sub.get(k, v) != v
        )
        if (out_features := sub.get("out_features")) and out_features[-1] != "stage4":
            problems.append(f"out_features={list(out_features)} (DETR reads the last stage, stage4)")
        return name or "resnet50", False, "native"
    name = str(sub.get("backbone") or "resnet50")
    base = name.removeprefix("timm/").split(".")[0]  # "resnet50.a1_in1k": the resnet50 architecture
    if base not in NATIVE_RESNETS:
        problems.append(f"backbone={name!r} (only timm's resnet18, resnet34, resnet50, resnet101)")
    if (stride := sub.get("output_stride")) not in (None, 16, 32):
        problems.append(f"output_stride={stride} (16 for DC5, or none)")
    if stride == 16 and base in ("resnet18", "resnet34"):
        problems.append(f"dilation with {base} (torchvision dilates bottleneck ResNets only)")
    if (out_indices := sub.get("out_indices")) and out_indices[-1] not in (4, -1):
        problems.append(f"out_indices={list(out_indices)} (DETR reads the last stage, 4)")
    if sub.get("features_only") is False:
        problems.append("features_only=false")
    return base, stride == 16, "timm"


def hf_architecture(config: Mapping[str, Any], where: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The :func:`build_detr` arguments and the backbone flavour (``timm`` | ``native``) of a
    ``config.json`` (a plain dict: transformers is not needed).

    Raises:
        CheckpointError: one message listing every field or value this DETR cannot reproduce.
    """
    problems: list[str] = []
    known = HF_FIELDS.keys() | HF_ALIASES.keys() | HF_OTHER_FIELDS | HF_TRAINING_FIELDS | HF_GENERIC_FIELDS
    if unknown := sorted(set(config) - known):
        problems.append(f"fields {unknown} (not read here)")
    if config.get("model_type", "detr") != "detr":
        problems.append(f"model_type={config['model_type']!r} (DETR only; not Conditional/Deformable DETR)")
    if architectures := [a for a in config.get("architectures") or () if a != "DetrForObjectDetection"]:
        problems.append(f"architectures={architectures} (DetrForObjectDetection only: no heads or masks)")
    value = {field: config.get(field, default) for field, (_, default) in HF_FIELDS.items()}
    for alias, field in HF_ALIASES.items():
        if alias in config and config[alias] != value[field]:
            if field in config:
                problems.append(f"{alias}={config[alias]} contradicts {field}={config[field]}")
            value[field] = config[alias]
    first_field: dict[str, str] = {}  # our argument -> the first field giving it
    for field, (ours, _) in HF_FIELDS.items():
        first = first_field.setdefault(ours, field)
        if value[field] != value[first]:
            problems.append(f"{first}={value[first]} != {field}={value[field]} (one value for both here)")
    if value["d_model"] % value["encoder_attention_heads"]:
        problems.append(f"d_model={value['d_model']} is not a multiple of the heads")
    problems.extend(
        f"{field}={value[field]!r} (only {allowed})"
        for field, allowed in HF_CHOICES.items()
        if value[field] not in allowed
    )
    if config.get("num_channels", 3) != 3:
        problems.append(f"num_channels={config['num_channels']} (RGB only)")
    backbone, dilation, flavour = _backbone(_backbone_config(config, problems), problems)
    if problems:
        raise CheckpointError(
            f"{where}: this Hugging Face DETR config cannot be reproduced here: {'; '.join(problems)}. "
            "Fix: use a DetrForObjectDetection with a ResNet-18/34/50/101 backbone (see the README's "
            "'Hugging Face checkpoints' for the supported fields)."
        )
    architecture = {ours: type(default)(value[field]) for field, (ours, default) in HF_FIELDS.items()}
    architecture.update(
        {argument: fixed for argument, (fixed, _) in HF_FIXED.items()},
        backbone=backbone,
        dilation=dilation,
        backbone_norm="frozen",
        num_classes=len(config.get("id2label") or ()) or int(config.get("num_labels", 2)),  # HF's default: 2
        num_groups=1,
    )
    return architecture, flavour


# ------------------------------------------------------------------ weights

HF_BACKBONE = "model.backbone.conv_encoder.model."
OUR_BACKBONE = "backbone.0.body."
#: Our key template -> HF's, outside the encoder/decoder layers and the backbone.
HEAD_KEYS = {
    "class_embed.{p}": "class_labels_classifier.{p}",
    "bbox_embed.layers.{i}.{p}": "bbox_predictor.layers.{i}.{p}",
    "query_embed.weight": "model.query_position_embeddings.weight",
    "input_proj.{p}": "model.input_projection.{p}",
    "backbone.1.row_embed.weight": "model.position_embedding.row_embeddings.weight",
    "backbone.1.col_embed.weight": "model.position_embedding.column_embeddings.weight",
    "transformer.decoder.norm.{p}": "model.decoder.layernorm.{p}",
}
#: Per encoder / decoder layer: our module -> HF's (an attention's packed ``in_proj`` is HF's q/k/v).
_LAYER = {"self_attn": "self_attn", "norm1": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2"}
LAYER_MODULES = {
    "encoder": {**_LAYER, "norm2": "final_layer_norm"},
    "decoder": {
        **_LAYER,
        "multihead_attn": "encoder_attn",
        "norm2": "encoder_attn_layer_norm",
        "norm3": "final_layer_norm",
    },
}
#: Other names of the same HF weights: transformers 5's in-memory names (``o_proj``, ``mlp.fc1``,
#: ``backbone.model``) and transformers 4's learned position embedding under the backbone.
HF_KEY_ALIASES = [
    (re.compile(r"^model\.backbone\.model\."), HF_BACKBONE),
    (re.compile(r"^model\.backbone\.position_embedding\."), "model.position_embedding."),
    (re.compile(r"\.o_proj\."), ".out_proj."),
    (re.compile(r"\.layers\.(\d+)\.mlp\.fc([12])\."), r".layers.\1.fc\2."),
]
#: The placeholders of key templates: an index, a parameter or buffer name, anything, and one of HF's
#: q/k/v projections (stacked along dim 0 in our packed ``in_proj``).
_PLACEHOLDERS = {"i": r"\d+", "p": r"[a-z_]+", "rest": r".+", "qkv": r"[qkv]"}


@functools.cache
def _regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, expression in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{expression})")
    return re.compile(pattern)


@functools.cache
def _key_templates(flavour: str) -> tuple[tuple[str, str], ...]:
    """``(our key template, HF's)`` of every weight of a DETR with the backbone ``flavour``."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown backbone flavour {flavour!r}; choose one of {FLAVOURS}")
    templates = dict(HEAD_KEYS)
    for part, modules in LAYER_MODULES.items():
        ours, hf = f"transformer.{part}.layers.{{i}}.", f"model.{part}.layers.{{i}}."
        for our_name, hf_name in modules.items():
            if our_name.endswith("attn"):  # in_proj is HF's q/k/v; then out_proj is renamed below
                templates[f"{ours}{our_name}.in_proj_{{p}}"] = f"{hf}{hf_name}.{{qkv}}_proj.{{p}}"
                our_name, hf_name = f"{our_name}.out_proj", f"{hf_name}.out_proj"
            templates[f"{ours}{our_name}.{{p}}"] = f"{hf}{hf_name}.{{p}}"
    ours, hf = OUR_BACKBONE, HF_BACKBONE
    if flavour == "timm":  # timm's ResNet has torchvision's names
        templates[f"{ours}{{rest}}"] = f"{hf}{{rest}}"
        return tuple(templates.items())
    templates[f"{ours}conv1.weight"] = f"{hf}embedder.embedder.convolution.weight"
    templates[f"{ours}bn1.{{p}}"] = f"{hf}embedder.embedder.normalization.{{p}}"
    for stage in range(4):
        layer, hf_layer = f"{ours}layer{stage + 1}.{{i}}.", f"{hf}encoder.stages.{stage}.layers.{{i}}."
        templates[f"{layer}downsample.0.weight"] = f"{hf_layer}shortcut.convolution.weight"
        templates[f"{layer}downsample.1.{{p}}"] = f"{hf_layer}shortcut.normalization.{{p}}"
        for conv in range(3):
            templates[f"{layer}conv{conv + 1}.weight"] = f"{hf_layer}layer.{conv}.convolution.weight"
            templates[f"{layer}bn{conv + 1}.{{p}}"] = f"{hf_layer}layer.{conv}.normalization.{{p}}"
    return tuple(templates.items())


def _translate(key: str, templates: Iterable[tuple[str, str]]) -> tuple[str, dict[str, str]] | None:
    """``(target, placeholder values)`` of the first pair whose source template matches ``key``, or None."""
    for source, target in templates:
        if match := _regex(source).fullmatch(key):
            return target, match.groupdict()
    return None


def hf_to_ours(hf_state: Mapping[str, Tensor], flavour: str, where: str | os.PathLike) -> dict[str, Tensor]:
    """Our state dict of a ``DetrForObjectDetection`` state dict, every key mapped.

    ``in_proj_weight (3D, D)`` is ``q_proj``, ``k_proj`` and ``v_proj`` ``(D, D)`` stacked. Backbone
    ``num_batches_tracked`` counters are dropped (frozen batch norm has none; transformers drops them too).

    Raises:
        CheckpointError: naming the HF keys that have no counterpart, or a q/k/v set with a part missing.
    """
    templates = [(hf, ours) for ours, hf in _key_templates(flavour)]
    ours: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}  # our in_proj key -> {"q": ..., "k": ..., "v": ...}
    unmapped = []
    for original, tensor in hf_state.items():
        key = original
        for pattern, replacement in HF_KEY_ALIASES:
            key = pattern.sub(replacement, key)
        if key.startswith(HF_BACKBONE) and key.endswith(".num_batches_tracked"):
            continue
        if (hit := _translate(key, templates)) is None:
            unmapped.append(original)
            continue
        template, values = hit
        if (projection := values.pop("qkv", None)) is None:
            ours[template.format(**values)] = tensor
        else:
            packed.setdefault(template.format(**values), {})[projection] = tensor
    incomplete = sorted(key for key, parts in packed.items() if len(parts) != 3)
    if unmapped or incomplete:
        flavour_name = "timm" if flavour == "timm" else "transformers ResNet"
        problems = [f"no counterpart for {shown_names(sorted(unmapped))}"] if unmapped else []
        problems += [f"q/k/v projections incomplete for {shown_names(incomplete)}"] if incomplete else []
        raise CheckpointError(
            f"{where}: the weights do not fit a DETR with a {flavour_name} backbone: {'; '.join(problems)}. "
            "Fix: give a DetrForObjectDetection folder written by save_pretrained, with the config.json "
            "of those weights."
        )
    return ours | {key: torch.cat([parts[x] for x in "qkv"]) for key, parts in packed.items()}


def ours_to_hf(state_dict: Mapping[str, Tensor], flavour: str) -> dict[str, Tensor]:
    """The ``DetrForObjectDetection`` state dict (the names ``save_pretrained`` writes) of our weights.

    Raises:
        CheckpointError: naming our keys that have no HF counterpart.
    """
    templates = _key_templates(flavour)
    hf: dict[str, Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        if (hit := _translate(key, templates)) is None:
            unmapped.append(key)
            continue
        template, values = hit
        if "{qkv}" in template:  # in_proj (3D, D): q, k and v (D, D) stacked
            for projection, part in zip("qkv", tensor.chunk(3), strict=True):
                hf[template.format(**values, qkv=projection)] = part
        else:
            hf[template.format(**values)] = tensor
    if unmapped:
        raise CheckpointError(f"no Hugging Face DETR weight for {shown_names(sorted(unmapped))}")
    return hf


# ------------------------------------------------------------------ reading


def is_hf_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` is a Hugging Face folder (any local folder, or a file of :data:`WEIGHT_FILES` or
    ``config.json`` beside a ``config.json``) or a hub id (``owner/name`` that is not a local path and
    does not end like a weight file)."""
    text = str(source)
    if text in OFFICIAL_DETR_URLS:
        return False
    path = Path(text).expanduser()
    if path.is_dir() or _in_hf_folder(path):
        return True
    if path.exists() or "://" in text:
        return False
    return bool(HUB_ID.fullmatch(text)) and not text.lower().endswith(_WEIGHT_SUFFIXES)


def _in_hf_folder(path: Path) -> bool:
    return (
        path.name in (CONFIG_FILE, *WEIGHT_FILES) and path.is_file() and (path.parent / CONFIG_FILE).is_file()
    )


def resolve_hf_folder(source: str | os.PathLike) -> Path:
    """The local folder of a Hugging Face DETR: ``source`` itself, or the hub id's snapshot in the hub
    cache (``config.json``, the first of :data:`WEIGHT_FILES`, ``preprocessor_config.json``), downloaded
    when missing unless ``HF_HUB_OFFLINE=1`` or ``DETR_LIGHTNING_OFFLINE=1``.

    Raises:
        CheckpointError: a folder without ``config.json``, an id the hub does not know.
        WeightsUnavailableError: an id that is neither cached nor downloadable (typically: offline).
    """
    path = Path(str(source)).expanduser()
    if _in_hf_folder(path):
        path = path.parent
    if not path.is_dir():
        return _download(str(source))
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{path} is a folder without {CONFIG_FILE}, so not a Hugging Face DETR. Fix: give a folder "
            f"written by save_pretrained ({CONFIG_FILE} + model.safetensors), or a weight file."
        )
    return path


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import constants, errors, hf_hub_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id} is not a local file or folder; as a Hugging Face hub id it needs huggingface_hub. "
            f"Fix: {INSTALL_HINT}, or give the local folder."
        ) from None
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    offline = hub_offline or os.environ.get(OFFLINE_ENV) == "1"
    # Why the files are not there when they are not: None when the hub says the repository lacks them.
    unavailable = "downloads are off (HF_HUB_OFFLINE or DETR_LIGHTNING_OFFLINE)" if offline else None
    how_to_fix = (
        f"Fix: on a machine with internet access run `hf download {repo_id} --local-dir DIR`, copy DIR here "
        f"and pass model.pretrained=DIR (or copy that machine's hub cache to {constants.HF_HUB_CACHE})."
    )

    def fetch(filename: str) -> Path | None:
        """The file in the hub cache (downloaded unless offline); None when the repository (offline: the
        cache) does not have it."""
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
        except errors.EntryNotFoundError as error:  # Local...: not cached; online: hub unreachable too
            if isinstance(error, errors.LocalEntryNotFoundError) and not offline:
                raise
            return None

    try:
        config = fetch(CONFIG_FILE)
        weights = next((path for name in WEIGHT_FILES if (path := fetch(name))), None)
    except errors.LocalEntryNotFoundError:
        config = weights = None
        unavailable = "it could not be downloaded"
    except errors.GatedRepoError:
        raise WeightsUnavailableError(
            f"{repo_id} is a gated Hugging Face model. Fix: accept its terms on huggingface.co and log in "
            f"(`hf auth login`); or {how_to_fix.removeprefix('Fix: ')}"
        ) from None
    except (errors.RepositoryNotFoundError, errors.HFValidationError):
        raise CheckpointError(
            f"{repo_id} is neither a local file or folder nor a model on the Hugging Face hub. Fix: check "
            "the path, or the hub id (owner/name)."
        ) from None
    except errors.HfHubHTTPError as error:
        raise WeightsUnavailableError(f"Could not download {repo_id} ({error}). {how_to_fix}") from None
    if (config is None or weights is None) and unavailable:
        raise WeightsUnavailableError(
            f"{repo_id} is not a local file or folder, and as a Hugging Face hub id it is not in the hub "
            f"cache ({constants.HF_HUB_CACHE}) and {unavailable}. {how_to_fix}"
        )
    if config is None or weights is None:
        missing = CONFIG_FILE if config is None else " or ".join(WEIGHT_FILES)
        raise CheckpointError(f"{repo_id} on the Hugging Face hub has no {missing}: not a transformers DETR.")
    with contextlib.suppress(errors.LocalEntryNotFoundError, errors.HfHubHTTPError):  # optional: the resize
        fetch(PREPROCESSOR_FILE)
    return config.parent


def _read_json_object(path: Path) -> dict[str, Any]:
    """:func:`~detr_lightning.files.read_json`, with an error where it would give {}."""
    if content := read_json(path):
        return content
    raise CheckpointError(
        f"{path} is not a readable JSON object (unreadable, not JSON, or empty). Fix: restore it from "
        "the source."
    )


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors`` (read with ``safetensors``, nothing unpickled) or else of
    ``pytorch_model.bin`` (``torch.load(weights_only=True)``), on the CPU."""
    safetensors_file, bin_file = (folder / name for name in WEIGHT_FILES)
    if safetensors_file.is_file():
        try:
            return load_file(safetensors_file, device="cpu")
        except Exception as error:  # safetensors raises its own error type, or OSError
            raise CheckpointError(
                f"{safetensors_file} is not a readable safetensors file ({error})."
            ) from None
    if bin_file.is_file():
        contents = load_weights_file(bin_file)
        if not isinstance(contents, Mapping) or not all(isinstance(v, Tensor) for v in contents.values()):
            raise CheckpointError(f"{bin_file} is not a state dict of tensors.")
        return dict(contents)
    sharded = sorted(p.name for p in folder.glob("*.index.json"))
    detail = f" (sharded weights {sharded} are not read)" if sharded else ""
    raise CheckpointError(
        f"{folder} has neither {WEIGHT_FILES[0]} nor {WEIGHT_FILES[1]}{detail}. Fix: save the model with "
        "save_pretrained(folder) into one file."
    )


def read_preprocessing(folder: Path) -> dict[str, Any]:
    """``scale`` / ``max_size`` (the resize), ``mean`` / ``std`` of ``preprocessor_config.json``; {}
    without one."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return {}
    processor = _read_json_object(path)
    result: dict[str, Any] = {}
    size = processor.get("size")
    if isinstance(size, Mapping) and size.get("shortest_edge"):
        scale, max_size = int(size["shortest_edge"]), size.get("longest_edge")
        no_cap = max_size is not None and max_size >= NO_CAP_FACTOR * scale  # as write_hf_folder writes it
        result.update(scale=scale, max_size=None if no_cap else max_size)
    elif isinstance(size, int):  # the first transformers DETR processors: size and max_size
        result.update(scale=size, max_size=processor.get("max_size"))
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        if processor.get(theirs) is not None:
            result[ours] = tuple(float(v) for v in processor[theirs])
    return result


def read_hf_checkpoint(
    source: str | os.PathLike,
) -> tuple[Path, dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """Read a Hugging Face DETR folder or hub id (:func:`resolve_hf_folder`) into our terms: its local
    folder (a hub id's snapshot in the hub cache); ``config`` (``config.json``), ``class_names`` (of
    ``id2label``) and ``preprocessing`` (:func:`read_preprocessing`); the weights under our key names; and
    the :func:`build_detr` arguments.

    Raises:
        CheckpointError: unsupported config fields, unmapped weights, or a class head that does not match
            ``id2label``.
    """
    folder = resolve_hf_folder(source)
    config = _read_json_object(folder / CONFIG_FILE)
    architecture, flavour = hf_architecture(config, folder / CONFIG_FILE)
    state_dict = hf_to_ours(read_hf_weights(folder), flavour, folder)
    head = state_dict.get("class_embed.weight")
    if head is not None and head.shape[0] != architecture["num_classes"] + 1:
        raise CheckpointError(
            f"{folder}: the class head has {head.shape[0] - 1} classes (+ no-object) but id2label has "
            f"{architecture['num_classes']}. Fix: make config.json's id2label list every class."
        )
    names = {int(label): str(name) for label, name in dict(config.get("id2label") or {}).items()}
    contents = {"config": config, "class_names": names, "preprocessing": read_preprocessing(folder)}
    return folder, contents, state_dict, architecture


# ------------------------------------------------------------------ writing


@dataclass(frozen=True)
class HFPreprocessing:
    """The input a model expects, written to ``preprocessor_config.json``: shorter side ``scale``, longer
    side at most ``max_size`` (None: no cap), pixels in [0, 1] normalized by ``mean`` and ``std``, batches
    zero-padded at the bottom/right."""

    scale: int
    max_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def import_transformers(purpose: str) -> ModuleType:
    """``transformers``, or a :class:`CheckpointError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"{purpose} needs transformers. Fix: {INSTALL_HINT}.") from None
    return transformers


def write_hf_folder(
    model: DETR,
    folder: str | os.PathLike,
    class_names: Mapping[int, str],
    preprocessing: HFPreprocessing,
    flavour: str | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face DETR folder: ``config.json`` (transformers' ``DetrConfig``,
    ``id2label`` from ``class_names``, unnamed labels as ``class <label>``), ``model.safetensors`` and
    ``preprocessor_config.json`` (``DetrImageProcessor`` with ``preprocessing``; its defaults for the rest:
    COCO format, rescale by 1/255, padding).

    Args:
        flavour: the backbone as transformers builds it: ``native`` (transformers' ResNet, no timm
            needed; the default) or ``timm`` (the default for DC5 models: only timm's ResNet dilates).

    Raises:
        CheckpointError: transformers missing, or a model transformers' DETR cannot compute (pre-norm,
            layer3 output, spatial prior; the message lists them), written nowhere.
    """
    transformers = import_transformers("Writing a Hugging Face folder")
    arch = model.architecture
    if not arch:
        raise CheckpointError(
            "transformers' DETR cannot reproduce this model: the model was not built by build_detr (no "
            "architecture to describe)."
        )
    flavour = flavour or ("timm" if arch["dilation"] else "native")
    problems = [  # what transformers' DETR cannot compute, as override-style settings
        f"model.{argument}={str(arch[argument]).lower()} ({why})"  # true/false as in an override
        for argument, (value, why) in HF_FIXED.items()
        if arch[argument] != value
    ]
    if flavour == "native" and arch["dilation"]:
        problems.append("model.dilation=true with transformers' ResNet (only timm's dilates: flavour=timm)")
    if problems:
        raise CheckpointError(f"transformers' DETR cannot reproduce this model: {'; '.join(problems)}.")
    state = {  # Group DETR's extra queries only train; frozen batch norm has no counter.
        key: value
        for key, value in model.state_dict().items()
        if key != "query_embed_groups" and not key.endswith(".num_batches_tracked")
    }
    weights = {
        key: value.detach().to("cpu", copy=True).contiguous()
        for key, value in ours_to_hf(state, flavour).items()
    }
    id2label = {label: str(class_names.get(label, f"class {label}")) for label in range(model.num_classes)}
    if flavour == "timm":
        backbone = {"use_timm_backbone": True, "backbone": arch["backbone"], "dilation": arch["dilation"]}
    else:
        resnet = transformers.ResNetConfig(
            **NATIVE_RESNETS[arch["backbone"]], out_features=["stage4"], **NATIVE_FIXED
        )
        backbone = {"use_timm_backbone": False, "backbone_config": resnet}
    config = transformers.DetrConfig(
        **backbone,
        **{field: arch[ours] for field, (ours, _) in HF_FIELDS.items()},
        # One dropout everywhere, as here and in the official code (transformers' default: 0 in attention).
        attention_dropout=arch["dropout"],
        activation_dropout=arch["dropout"],
        id2label=id2label,
        label2id={name: label for label, name in id2label.items()},
        architectures=["DetrForObjectDetection"],
        use_pretrained_backbone=False,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(weights, folder / WEIGHT_FILES[0], metadata={"format": "pt"})
    longest_edge = preprocessing.max_size or NO_CAP_FACTOR * preprocessing.scale
    transformers.DetrImageProcessor(
        size={"shortest_edge": preprocessing.scale, "longest_edge": longest_edge},
        image_mean=list(preprocessing.mean),
        image_std=list(preprocessing.std),
    ).save_pretrained(folder)
    return folder
