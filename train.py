"""Train DETR: `python train.py experiment=demo`, `python train.py data.root=DIR`, sweeps with `-m`"""

import hydra
from omegaconf import DictConfig

from detr_lightning.config import register_configs
from detr_lightning.sweep import is_multirun, optimized_value, record_optimized_value, run_sweep_job
from detr_lightning.training import exit_on_user_error, train, user_error

register_configs()  # the schemas conf/ composes with: every value is type-checked


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the best ``optimized_metric`` (None if the job failed) for a sweeper to optimize.

    In a multirun the value is also recorded in the job's ``job_status.json`` (``optimized_value``)."""
    if is_multirun():  # a failing job is recorded in its folder and the sweep goes on
        metrics = run_sweep_job(train, cfg, user_error=user_error)
        return record_optimized_value(optimized_value(cfg, metrics))
    with exit_on_user_error():
        metrics = train(cfg)
    return optimized_value(cfg, metrics)


if __name__ == "__main__":
    main()
