"""Weights & Biases for Hydra runs: a `WandbLogger` that never waits on a login prompt or the network.

``conf/logger/wandb.yaml`` builds it with :func:`wandb_logger`. The mode is decided before wandb starts:

- ``WANDB_MODE`` set: wandb's own choice (``offline``/``dryrun``, ``online``/``run``, ``disabled``);
- ``offline: true``: offline; ``offline: false``: online, and an error if no credentials are found;
- ``offline: null`` (default): online when credentials are found (``WANDB_API_KEY``,
  ``WANDB_IDENTITY_TOKEN_FILE`` or a ``.netrc`` entry for the server) *and* the server answers within a
  few seconds, else offline.

An offline run is written to ``<save_dir>/wandb/offline-run-<time>-<id>/`` and one log line says how to
upload it. The jobs of a Hydra multirun share a W&B group (the sweep folder's name); each job is its own
run because `detr_lightning.sweep.run_sweep_job` finishes the run when the job ends.
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)

WANDB_DEFAULT_BASE_URL = "https://api.wandb.ai"
SERVER_PROBE_TIMEOUT_S = 3.0  # for the W&B server to accept a connection before the run goes offline
#: ``WANDB_MODE`` values and the mode each one means.
_ENV_MODES = dict(online="online", run="online", offline="offline", dryrun="offline", disabled="disabled")


class WandbSettingError(ValueError):
    """A W&B setting that cannot work (``WANDB_MODE``, online without credentials): a user error."""


class WandbLoggerWithSyncHint(WandbLogger):
    """A `WandbLogger` that, when it starts an offline run, logs the one command that uploads it, with
    ``offline_reason`` (e.g. ``"no W&B credentials found"``)."""

    def __init__(self, *args: Any, offline_reason: str = "offline mode", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offline_reason = offline_reason
        self._sync_hint_logged = False
        # Lightning always passes anonymous=None, which wandb (>= 0.19) answers with a deprecation warning;
        # WandbLogger has no public way to leave the argument out.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self) -> Any:
        run = super().experiment
        # `is True`: on ranks other than 0 Lightning returns a stand-in whose every attribute is a function.
        if not self._sync_hint_logged and getattr(run, "offline", False) is True:
            self._sync_hint_logged = True
            sync_dir = run.settings.sync_dir
            log.info("W&B offline (%s): run `wandb sync %s` to upload", self.offline_reason, sync_dir)
        return run


def wandb_logger(
    project: str = "detr-lightning",
    save_dir: str | os.PathLike = ".",
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = "train",
    tags: Sequence[str] = (),
    entity: str | None = None,
    offline: bool | None = None,
    log_model: bool | Literal["all"] = False,
    **wandb_init_kwargs: Any,
) -> WandbLoggerWithSyncHint:
    """A `WandbLogger` in a mode that needs no prompt (``offline``: see the module docstring).

    ``name`` defaults to the Hydra job's ``override_dirname``, ``group`` to the sweep folder's name in a
    multirun; ``log_model`` is switched off (with a warning) offline; the W&B files go to
    ``<save_dir>/wandb``; the rest goes to ``wandb.init``. A `WandbSettingError` where wandb would prompt:
    online without credentials.
    """
    mode, offline_reason = resolve_wandb_mode(offline)
    if mode == "offline" and log_model:
        rank_zero_warn(
            f"logger.wandb.log_model={log_model} is ignored: W&B is offline ({offline_reason}), checkpoints "
            "stay in the run folder. Fix: log in (`wandb login` or WANDB_API_KEY) to upload them."
        )
        log_model = False
    init_kwargs: dict[str, Any] = {"mode": mode, **wandb_init_kwargs}
    if mode == "offline" and "settings" not in init_kwargs:
        import wandb

        # The sync hint is our one line; wandb's own end-of-run summary and sync advice are left out.
        init_kwargs["settings"] = wandb.Settings(quiet=True)
    job_overrides, sweep_name = _hydra_names()
    return WandbLoggerWithSyncHint(
        name=name or job_overrides,
        save_dir=os.fspath(save_dir),
        project=project,
        entity=entity,
        group=group or sweep_name,
        job_type=job_type,
        tags=list(tags),
        log_model=log_model,
        offline_reason=offline_reason,
        **init_kwargs,
    )


def resolve_wandb_mode(offline: bool | None) -> tuple[str, str]:
    """``(mode, why)``: the ``wandb.init`` mode (``online``, ``offline``, ``disabled``) and the reason."""
    if offline:
        return "offline", "logger.wandb.offline=true"
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode not in ("", *_ENV_MODES):
        raise WandbSettingError(
            f"WANDB_MODE={env_mode!r} is not a W&B mode. Fix: unset it or use one of {', '.join(_ENV_MODES)}."
        )
    if _ENV_MODES.get(env_mode, "online") != "online":
        return _ENV_MODES[env_mode], f"WANDB_MODE={env_mode}"
    wants_online = offline is False or bool(env_mode)
    base_url = os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_BASE_URL
    if not wandb_credentials_found(base_url):
        if wants_online:
            setting = f"WANDB_MODE={env_mode}" if env_mode else "logger.wandb.offline=false"
            fallback = "unset WANDB_MODE" if env_mode else "use logger.wandb.offline=null"
            raise WandbSettingError(
                f"{setting} asks for W&B online, but no credentials for {base_url} were found "
                "(WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or ~/.netrc), so wandb would wait on a login "
                f"prompt. Fix: run `wandb login` or set WANDB_API_KEY; or {fallback} to fall back to offline."
            )
        return "offline", "no W&B credentials found"
    if wants_online or wandb_server_reachable(base_url):
        return "online", ""
    return "offline", f"{base_url} unreachable"


def wandb_credentials_found(base_url: str = WANDB_DEFAULT_BASE_URL) -> bool:
    """Whether wandb can log in to ``base_url`` without asking: an API key or token file in the environment,
    or a ``.netrc`` entry (``$NETRC``, ``~/.netrc`` or ``~/_netrc``) with a password for its host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(base_url).hostname
    # As wandb: $NETRC, when set, is the only file read.
    names = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    paths = [Path(name).expanduser() for name in names]
    netrc_path = next((path for path in paths if path.is_file()), None)
    if host is None or netrc_path is None:
        return False
    try:
        entry = netrc.netrc(netrc_path).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def wandb_server_reachable(base_url: str, timeout_s: float = SERVER_PROBE_TIMEOUT_S) -> bool:
    """Whether ``base_url``'s host accepts a TCP connection within ``timeout_s`` (name lookup included)."""
    parts = urlsplit(base_url)
    if parts.hostname is None:
        return False
    address = (parts.hostname, parts.port or (80 if parts.scheme == "http" else 443))
    connected = threading.Event()

    def connect() -> None:
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=timeout_s):
            connected.set()

    # A daemon thread, because a name lookup ignores socket timeouts and may hang on a broken resolver.
    probe = threading.Thread(target=connect, name="wandb-server-probe", daemon=True)
    probe.start()
    probe.join(timeout_s)
    return connected.is_set()


def _hydra_names() -> tuple[str | None, str | None]:
    """The Hydra job's overrides as ``key=value,...`` and, in a multirun, the sweep folder's name."""
    if not HydraConfig.initialized():
        return None, None
    config = HydraConfig.get()
    sweep_name = Path(config.sweep.dir).name if config.mode == RunMode.MULTIRUN else None
    return config.job.override_dirname or None, sweep_name
