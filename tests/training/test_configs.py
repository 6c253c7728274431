"""Every config group composes, and the experiments hold the settings they promise."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detr_lightning.training import build_module

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize(
    "group",
    [
        "backbone",
        "transformer",
        "matcher",
        "loss",
        "optimizer",
        "scheduler",
        "data",
        "trainer",
        "logger",
        "speed",
    ],
)
def test_every_option_of_every_group_composes(compose_config, group):
    stored = ConfigStore.instance().repo.get(group, {})  # the schema groups of detr_lightning.config
    options = {p.stem for p in (CONF / group).glob("*.yaml")} | {
        name.removesuffix(".yaml") for name in stored
    }
    assert options, group
    for option in sorted(options):
        cfg = compose_config([f"{group}={option}", "data.root=/some/data"])
        OmegaConf.to_container(cfg.model, resolve=True)


def test_experiments_compose(compose_config):
    for experiment in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        cfg = compose_config([f"experiment={experiment}"])
        assert cfg.task_name == experiment


def test_without_an_experiment_a_data_root_gets_the_official_fine_tuning_recipe(compose_config):
    cfg = compose_config(["data.root=/my/data"])
    assert cfg.task_name == "train" and cfg.model.pretrained == "detr_r50"
    assert (cfg.model.backbone, cfg.model.dilation, cfg.model.backbone_norm) == ("resnet50", False, "frozen")
    assert (cfg.model.hidden_dim, cfg.model.nheads, cfg.model.enc_layers, cfg.model.dec_layers) == (
        256,
        8,
        6,
        6,
    )
    assert (cfg.model.num_queries, cfg.model.dropout, cfg.model.spatial_prior, cfg.model.num_groups) == (
        100,
        0.1,
        "none",
        1,
    )
    assert list(cfg.data.train_scales) == list(range(480, 801, 32)) and cfg.data.train_max_size == 1333
    assert (cfg.data.val_scale, cfg.data.val_max_size, cfg.data.batch_size) == (800, 1333, 2)
    assert (cfg.optimizer.lr, cfg.optimizer.lr_backbone, cfg.optimizer.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert (cfg.trainer.gradient_clip_val, cfg.scheduler.lr_drop, cfg.trainer.max_epochs) == (0.1, 200, 300)
    assert (cfg.loss.ce_loss_coef, cfg.loss.bbox_loss_coef, cfg.loss.giou_loss_coef, cfg.loss.eos_coef) == (
        1,
        5,
        2,
        0.1,
    )


def test_fire_extinguishers_reproduces_the_run_settings(compose_config):
    cfg = compose_config(["experiment=fire_extinguishers", "data.root=/data/fire"])
    assert cfg.model.backbone == "resnet50" and cfg.model.dilation is False
    assert (cfg.model.num_classes, cfg.model.num_queries, cfg.model.aux_loss) == (2, 100, True)
    assert cfg.model.pretrained == "detr_r50" and cfg.model.position_embedding == "sine"
    assert (cfg.model.hidden_dim, cfg.model.nheads, cfg.model.enc_layers, cfg.model.dec_layers) == (
        256,
        8,
        6,
        6,
    )
    assert (cfg.model.dim_feedforward, cfg.model.dropout, cfg.model.pre_norm) == (2048, 0.1, False)
    assert (cfg.optimizer.lr, cfg.optimizer.lr_backbone, cfg.optimizer.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert (cfg.matcher.cost_class, cfg.matcher.cost_bbox, cfg.matcher.cost_giou) == (1, 5, 2)
    assert (cfg.loss.bbox_loss_coef, cfg.loss.giou_loss_coef, cfg.loss.eos_coef) == (5, 2, 0.1)
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val) == (2, 5, 0.1)
    assert (cfg.seed, cfg.scheduler.lr_drop) == (42, 200)
    module = build_module(cfg, num_classes=cfg.model.num_classes)
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert trainable == 41_279_495  # "number of params" in the run's log


def test_loss_overrides_reach_the_criterion(compose_config):
    cfg = compose_config(
        [
            "experiment=demo",
            "loss.bbox_loss_coef=3",
            "loss.giou_loss_coef=4",
            "loss.eos_coef=0.2",
            "matcher.cost_giou=7",
        ]
    )
    module = build_module(cfg, num_classes=5)
    assert module.criterion.weight_dict["loss_bbox_0"] == 3 and module.criterion.weight_dict["loss_giou"] == 4
    assert module.criterion.empty_weight[-1] == pytest.approx(0.2)
    assert module.criterion.matcher.cost_giou == 7


def test_no_aux_loss_switches_the_aux_outputs_off(compose_config):
    module = build_module(compose_config(["experiment=demo", "loss.aux_loss=false"]), num_classes=5)
    assert module.model.aux_loss is False and set(module.criterion.weight_dict) == {
        "loss_ce",
        "loss_bbox",
        "loss_giou",
    }


def test_trainer_and_loggers_instantiate(compose_config, tmp_path):
    cfg = compose_config(["experiment=demo", "logger=csv", f"hydra.run.dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.gradient_clip_val == 0.1 and trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_file_loggers_write_metrics(compose_config, tmp_path, logger):
    cfg = compose_config(["experiment=demo", f"logger={logger}", f"paths.output_dir={tmp_path}"])
    (instance,) = [instantiate(node) for node in cfg.logger.values()]
    instance.log_metrics({"val/map": 0.5}, step=1)
    instance.finalize("success")
    assert any(path.is_file() for path in tmp_path.rglob("*")), f"{logger} wrote nothing under {tmp_path}"


def _assert_scales_fit_the_generated_images(data: dict, shapes) -> None:
    """Training draws the generated image sides themselves (no upscaling past them); validation sits in
    between; the crops are taken after a resize to some of the training scales; the longer-side caps
    leave the scales untouched."""
    assert (min(data["train_scales"]), max(data["train_scales"])) == (shapes.min_side, shapes.max_side)
    assert shapes.min_side <= data["val_scale"] <= shapes.max_side
    assert min(data["train_crop_size"]) < shapes.min_side
    assert set(data["train_crop_resize_scales"]) <= set(data["train_scales"])
    assert min(data["train_max_size"], data["val_max_size"]) >= shapes.max_side


def test_demo_config_scales_fit_the_generated_images(compose_config):
    from detr_lightning.data.demo import DemoShapes

    data = OmegaConf.to_container(compose_config(["experiment=demo"]).data, resolve=True)
    assert data["demo_options"] is None  # the built-in demo: the generator's defaults
    _assert_scales_fit_the_generated_images(data, DemoShapes())


def test_crowded_demo_config_matches_the_generator(compose_config):
    from detr_lightning.data.demo import CROWDED_DEMO_OPTIONS, DemoShapes

    cfg = compose_config(["experiment=demo_crowded"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data["demo_options"] == CROWDED_DEMO_OPTIONS
    _assert_scales_fit_the_generated_images(data, DemoShapes(**CROWDED_DEMO_OPTIONS))
    assert data["root"].endswith("demo_crowded") and data["demo_root"] == data["root"]
    assert cfg.model.spatial_prior == "gaussian" and cfg.model.num_queries == 30


def test_exact_resume_with_dropout_is_an_opt_in_callback(compose_config):
    from detr_lightning.callbacks.epoch_seed import EpochSeed

    default = compose_config(["experiment=demo"]).callbacks
    assert "epoch_seed" not in default  # the default run draws from PyTorch's plain random stream
    cfg = compose_config(["experiment=demo", "callbacks=exact_resume", "seed=7"])
    assert list(cfg.callbacks) == [*default, "epoch_seed"]
    callback = instantiate(cfg.callbacks.epoch_seed)
    assert isinstance(callback, EpochSeed) and callback.seed == 7
    with pytest.raises(Exception, match="callbacks=exact_resume needs a seed"):
        instantiate(compose_config(["callbacks=exact_resume", "seed=null"]).callbacks.epoch_seed)


def test_coco_like_data_config_matches_the_generator(compose_config):
    from detr_lightning.data.demo import REALISTIC_DEMO_OPTIONS

    data = OmegaConf.to_container(compose_config(["data=coco_like"]).data, resolve=True)
    assert {key: data["demo_options"][key] for key in REALISTIC_DEMO_OPTIONS} == REALISTIC_DEMO_OPTIONS
    assert list(data["train_scales"]) == list(range(480, 801, 32)) and data["train_max_size"] == 1333


@pytest.mark.filterwarnings("ignore:.pin_memory. argument is set as true")
def test_speed_gpu_turns_on_each_lever_as_its_own_key_and_builds_on_a_cpu(
    compose_config, small_demo, tmp_path
):
    """``speed=gpu``: every lever a key of its group, each switched alone by an override; with
    ``trainer.accelerator=cpu`` the run's parts build (compilation is lazy: nothing compiles here)."""
    import torch

    from detr_lightning.speed import apply_speed_config

    official = compose_config(["data.root=/data"])
    assert (official.trainer.precision, official.optimizer.fused, official.data.pad_to_multiple) == (
        "32-true",
        None,
        None,
    )
    assert not official.speed.compile and not official.speed.channels_last
    cfg = compose_config(
        ["experiment=demo", "speed=gpu", "trainer.accelerator=cpu", f"data.root={small_demo}"]
        + [f"paths.output_dir={tmp_path}", "data.num_workers=0", "data.persistent_workers=false"]
    )
    speed = cfg.speed
    assert (speed.channels_last, speed.compile, speed.compile_mode) == (True, True, "reduce-overhead")
    assert (speed.compile_target, speed.compile_dynamic) == ("transformer", True)
    assert (cfg.trainer.precision, cfg.trainer.benchmark) == ("bf16-mixed", True)
    assert cfg.optimizer.fused is True  # clipped by the module under bf16-mixed (test_lit_module.py)
    assert (cfg.data.pad_to_multiple, cfg.data.pin_memory) == (128, True)
    gpu = compose_config(["speed=gpu", "data.root=/data"]).data
    assert gpu.num_workers == 8 and gpu.persistent_workers is True
    one_lever_off = compose_config(
        ["speed=gpu", "data.root=/data", "speed.compile=false", "data.pad_to_multiple=null"]
    )
    assert one_lever_off.speed.compile is False and one_lever_off.data.pad_to_multiple is None
    assert one_lever_off.speed.channels_last is True and one_lever_off.trainer.precision == "bf16-mixed"

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert all(side % 128 == 0 for side in next(iter(datamodule.train_dataloader())).images.shape[-2:])
    module = build_module(cfg, num_classes=datamodule.num_classes)
    apply_speed_config(module.model, cfg.speed)
    assert module.model.transformer._compiled_call_impl is not None  # compiled on its first call
    assert module.model._compiled_call_impl is None  # the backbone runs eagerly
    benchmark = torch.backends.cudnn.benchmark
    try:
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    finally:
        torch.backends.cudnn.benchmark = benchmark  # Lightning sets it for the process
    assert trainer.precision == "bf16-mixed"


def test_the_whole_model_compiled_per_bucket_needs_a_recompile_limit_above_the_buckets(compose_config):
    """``speed=gpu speed.compile_target=model speed.compile_dynamic=false speed.compile_recompile_limit=64``:
    the alternative that compiles the whole model once per batch shape (set process-wide, restored)."""
    import torch._dynamo

    from detr_lightning.speed import apply_speed_config

    overrides = [
        "speed.compile_target=model",
        "speed.compile_dynamic=false",
        "speed.compile_recompile_limit=64",
    ]
    cfg = compose_config(["experiment=demo", "speed=gpu", *overrides])
    limit = torch._dynamo.config.recompile_limit
    try:
        model = apply_speed_config(build_module(cfg, num_classes=5).model, cfg.speed)
        assert torch._dynamo.config.recompile_limit == 64 and model._compiled_call_impl is not None
    finally:
        torch._dynamo.config.recompile_limit = limit
    with pytest.raises(Exception, match="compile_target"):
        compose_config(["speed=gpu", "speed.compile_target=backbone"])
