"""Structured configs: the one place for the defaults, types and choices of every setting.

- ``loss``, ``matcher``, ``optimizer``, ``scheduler``, ``postprocess``: the dataclasses the LightningModule
  takes as its arguments (:mod:`detr_lightning.lit_module`).
- ``model``, ``data``, ``trainer``, ``speed``: read from the typed signatures of
  :func:`~detr_lightning.models.build_detr`, :class:`~detr_lightning.data.CocoDataModule`,
  ``lightning.Trainer`` and :func:`~detr_lightning.speed.apply_speed_options` by
  :func:`signature_schema`: the code's own defaults, types and ``Literal`` choices are the config's.
- :class:`PredictConfig`; :class:`ExportConfig`, :class:`ExportSettings` (what every export format
  shares) and the rest of ``export.py``.

:func:`register_configs` stores them in Hydra's ConfigStore. The command configs of ``conf/`` (train, eval,
predict, export) start their defaults list with them, so Hydra checks every value as it composes the
config: a wrong type or an unknown choice stops the command at once (``Error merging override
KEY=VALUE`` and what was expected), before anything is built.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from detr_lightning.data import CocoDataModule
from detr_lightning.distributed import launched_rank
from detr_lightning.inference import InferenceSettingError
from detr_lightning.lit_module import (
    LossConfig,
    MatcherConfig,
    OptimizerConfig,
    PostprocessConfig,
    SchedulerConfig,
)
from detr_lightning.models import build_detr
from detr_lightning.speed import apply_speed_options


class ConfigError(ValueError):
    """A config value the run cannot use: the message names the key, the value and the fix."""


# ------------------------------------------------------------------------------------ from signatures
_PRIMITIVES = (bool, int, float, str)


class Choice(str, enum.Enum):
    """One of a ``Literal``'s words, as OmegaConf checks it; it prints and compares as its word."""

    def __str__(self) -> str:  # format() and f-strings use it too
        return str(self.value)


def _field_type(annotation: Any, name: str) -> Any:
    """What OmegaConf can check of a Python annotation: primitives, ``Optional``, ``Literal`` choices
    (as an Enum of the choices), lists of primitives; anything else is ``Any``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _PRIMITIVES:
        return annotation
    if origin is Literal and all(isinstance(a, str) for a in args):
        return Choice(name, {choice: choice for choice in args})
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        if len(kept) == 1 and len(args) == 2:
            inner = _field_type(kept[0], name)
            return inner | None if inner is not Any else Any
        return Any
    if origin in (list, tuple, Sequence) and args and args[0] in _PRIMITIVES:
        return list[args[0]]
    return Any


def signature_schema(
    target: Callable, name: str, skip: Sequence[str] = (), extra: Mapping[str, tuple[Any, Any]] | None = None
) -> type:
    """A dataclass of ``target``'s keyword parameters, with their annotations and defaults.

    Args:
        target: a function or class with a typed signature.
        skip: parameters that are not configured (passed in code).
        extra: ``name -> (type, default)`` of further config keys (e.g. ``_target_``).
    """
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    fields = []
    for parameter in inspect.signature(target).parameters.values():
        if parameter.name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        kind = _field_type(hints.get(parameter.name, Any), parameter.name)
        default = MISSING if parameter.default is parameter.empty else parameter.default
        if isinstance(default, list | tuple):
            fields.append((parameter.name, kind, field(default_factory=lambda d=default: list(d))))
        else:
            fields.append((parameter.name, kind, field(default=default)))
    extra = dict(extra or {})
    fields = [item for item in fields if item[0] not in extra]
    fields += [(key, kind, field(default=default)) for key, (kind, default) in extra.items()]
    return dataclasses.make_dataclass(name, fields)


ModelSchema = signature_schema(
    build_detr,
    "ModelSchema",
    extra={
        "num_classes": (int | None, None),  # null: from the data
        # DETR weights to start from: detr_r50 | detr_r50_dc5 | detr_r101 | detr_r101_dc5 | URL | path | null
        "pretrained": (str | None, None),
    },
)
DataSchema = signature_schema(
    CocoDataModule, "DataSchema", extra={"_target_": (str, "detr_lightning.data.CocoDataModule")}
)
TrainerSchema = signature_schema(
    lightning.Trainer,
    "TrainerSchema",
    skip=("callbacks", "logger"),  # instantiated from their own groups
    extra={"_target_": (str, "lightning.Trainer")},
)
SpeedSchema = signature_schema(apply_speed_options, "SpeedSchema", skip=("model",))


# ---------------------------------------------------------------------------------------- whole commands
@dataclass
class RunConfig:
    """What ``train.py`` and ``eval.py`` share; the groups fill it (``conf/``)."""

    task_name: str = MISSING
    seed: int | None = 42
    # A Lightning checkpoint of this project: train.py resumes from it, eval.py evaluates it.
    ckpt_path: str | None = None
    model: Any = field(default_factory=ModelSchema)
    loss: LossConfig = MISSING
    matcher: MatcherConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    data: Any = field(default_factory=DataSchema)
    trainer: Any = field(default_factory=TrainerSchema)
    speed: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    paths: Any = None
    debug: Any = None
    experiment: Any = None
    # A training step whose loss or gradients are NaN/inf is skipped; this many in a row stop the run.
    max_consecutive_nonfinite: int = 5


@dataclass
class TrainConfig(RunConfig):
    test: bool = True  # test the best checkpoint after training (when the data has a test split)
    optimized_metric: str | None = "val/map"  # what train.py returns to a sweeper
    optimized_metric_mode: Literal["max", "min"] = "max"


@dataclass
class EvalConfig(RunConfig):
    split: Literal["val", "test"] = "val"


@dataclass(frozen=True)
class ExportSettings:
    """What every export format shares: the example input it is traced on, and the check against PyTorch.

    Raises `InferenceSettingError` on an example input too small to export.
    """

    height: int = 800  # the example input (a fixed-size ONNX graph takes exactly this size)
    width: int = 1066
    batch_size: int = 1
    dynamic: bool = True  # ONNX: symbolic batch, height and width; both formats: also check a second size
    mask_input: bool = True  # take the (B, H, W) padding mask as a second input (else images only)
    atol: float = 1e-4  # the largest accepted |exported - PyTorch| on the check inputs
    verify: bool = True  # run the exported model on the check inputs and compare it with PyTorch

    def __post_init__(self) -> None:
        if min(self.height, self.width) < 32 or self.batch_size < 1:
            raise InferenceSettingError(
                f"height={self.height}, width={self.width}, batch_size={self.batch_size}: the example input "
                "needs at least 32x32 pixels and one image (official size: height=800 width=1066)."
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ExportSettings:
        """The settings of ``conf/export.yaml``."""
        return cls(**{setting.name: cfg[setting.name] for setting in dataclasses.fields(cls)})

    @property
    def input_names(self) -> list[str]:
        return ["images", "mask"] if self.mask_input else ["images"]


ExportFormat = Literal["onnx", "torchscript", "huggingface"]
#: auto: dynamo, else legacy; dynamo: ``torch.onnx.export(dynamo=True)``; legacy: ``dynamo=False``.
OnnxExporter = Literal["auto", "dynamo", "legacy"]


@dataclass
class PretrainedWeights:
    """``model`` of predict and export: weights to use instead of a checkpoint of this project."""

    # detr_r50 | detr_r50_dc5 | detr_r101 | detr_r101_dc5 | URL | path | Hugging Face folder | hub id
    pretrained: str | None = None


@dataclass
class PredictConfig:
    """``predict.py``: the keys are described in ``conf/predict.yaml``."""

    task_name: str = "predict"
    ckpt_path: str | None = None
    model: PretrainedWeights = field(default_factory=PretrainedWeights)
    input: str | None = MISSING
    threshold: float = 0.7
    batch_size: int = 4
    device: str = "auto"
    num_workers: int = 2
    class_names: list[str] | None = None
    scale: int | None = None
    max_size: int | None = None
    attention: bool = False
    attention_pixel: list[float] | None = None
    progress: bool = True
    output_dir: str = MISSING


@dataclass
class ExportConfig(signature_schema(ExportSettings, "ExportSettingsSchema")):
    """``export.py``: the keys are described in ``conf/export.yaml``."""

    task_name: str = "export"
    ckpt_path: str | None = None
    model: PretrainedWeights = field(default_factory=PretrainedWeights)
    format: ExportFormat = "onnx"
    onnx_exporter: OnnxExporter = "auto"
    opset: int | None = None  # null: the exporter's default
    output_dir: str = MISSING


def _with_enums(schema: type, done: dict[type, type]) -> type:
    """``schema`` as OmegaConf can check it: its ``Literal`` fields as Enums, recursively (one class per
    schema in ``done``, so that a group's node merges into the field it fills)."""
    if schema not in done:
        hints = typing.get_type_hints(schema)
        fields = []
        for item in dataclasses.fields(schema):
            kind = hints[item.name]
            if dataclasses.is_dataclass(kind):
                kind = _with_enums(kind, done)
            elif typing.get_origin(kind) is not None:
                kind = _field_type(kind, item.name)
            default = {"default": item.default}
            if item.default_factory is not dataclasses.MISSING:
                converted = dataclasses.is_dataclass(kind) and item.default_factory is hints[item.name]
                default = {"default_factory": kind if converted else item.default_factory}
            fields.append((item.name, kind, field(**default)))
        done[schema] = dataclasses.make_dataclass(schema.__name__, fields)
    return done[schema]


def _rank_zero_only(value: Any) -> Any:
    return value if launched_rank() == 0 else None


def _rank_suffix() -> str:
    rank = launched_rank()
    return f".rank{rank}" if rank else ""


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (the ``<command>_schema`` nodes and the groups' defaults
    below); entry scripts and tests that compose ``conf/`` call this first.

    Also the resolvers ``conf/`` uses so that only rank 0 of a multi-process run writes Hydra's files:
    ``${detr.rank_zero_only:VALUE}`` (VALUE on rank 0, else null: ``hydra.output_subdir``) and
    ``${detr.rank_suffix:}`` (``""`` on rank 0, else ``.rank<N>``: the other ranks' own log files)."""
    OmegaConf.register_new_resolver("detr.rank_zero_only", _rank_zero_only, replace=True)
    OmegaConf.register_new_resolver("detr.rank_suffix", _rank_suffix, replace=True)
    store = ConfigStore.instance()
    done: dict[type, type] = {}
    store.store(name="train_schema", node=_with_enums(TrainConfig, done))
    store.store(name="eval_schema", node=_with_enums(EvalConfig, done))
    store.store(name="predict_schema", node=_with_enums(PredictConfig, done))
    store.store(name="export_schema", node=_with_enums(ExportConfig, done))
    store.store(group="loss", name="default", node=done[LossConfig])
    store.store(group="matcher", name="default", node=done[MatcherConfig])
    store.store(group="optimizer", name="adamw", node=done[OptimizerConfig])
    store.store(group="scheduler", name="step", node=done[SchedulerConfig])
    store.store(group="speed", name="default", node=SpeedSchema)


def group_values(node: DictConfig) -> dict[str, Any]:
    """A composed group as plain values (choices as their strings): what the LightningModule takes."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


#: Settings that must be above 0 (or, ``NON_NEGATIVE_KEYS``, 0 or more) when set; the top-level keys are
#: predict.py's and export.py's. Types are checked at composition; these are values.
POSITIVE_KEYS = tuple(
    """model.num_classes model.num_queries model.num_groups model.spatial_prior_sigma model.hidden_dim
    model.nheads model.dec_layers model.dim_feedforward postprocess.top_k scheduler.lr_drop
    max_consecutive_nonfinite speed.compile_recompile_limit batch_size atol""".split()
)
NON_NEGATIVE_KEYS = tuple(
    "model.enc_layers optimizer.lr optimizer.weight_decay data.num_workers num_workers".split()
)


def check_values(cfg: DictConfig) -> None:
    """Raise a :class:`ConfigError` for a value out of its range (:data:`POSITIVE_KEYS`,
    :data:`NON_NEGATIVE_KEYS`, ``model.hidden_dim`` against ``model.nheads``, ``loss.prior_prob``,
    ``opset``)."""
    for key in (*POSITIVE_KEYS, *NON_NEGATIVE_KEYS):
        value, positive = OmegaConf.select(cfg, key, default=None), key in POSITIVE_KEYS
        if value is not None and (value <= 0 if positive else value < 0):
            rule, fix = ("positive", "above 0") if positive else ("0 or more", "of 0 or more")
            raise ConfigError(f"config: {key}={value!r} must be {rule}. Fix: give {key} a value {fix}.")
    width, heads = (OmegaConf.select(cfg, f"model.{key}", default=None) for key in ("hidden_dim", "nheads"))
    if width and heads and (width % heads or width % 2):  # the position encoding: half of it per axis
        step = math.lcm(2, heads)
        raise ConfigError(
            f"config: model.hidden_dim={width} must be even and a multiple of model.nheads={heads}. "
            f"Fix: e.g. model.hidden_dim={max(step, round(width / step) * step)}."
        )
    prior = OmegaConf.select(cfg, "loss.prior_prob", default=None)
    if prior is not None and not 0 < prior < 1:
        raise ConfigError(
            f"config: loss.prior_prob={prior!r} must be between 0 and 1. Fix: e.g. 0.01, or null for off."
        )
    opset = OmegaConf.select(cfg, "opset", default=None)  # export.py's; the legacy exporter: SDPA from 14
    if opset is not None and opset < 14:
        raise ConfigError(
            f"config: opset={opset}: DETR's attention needs 14 or newer. Fix: opset=14, or null."
        )
