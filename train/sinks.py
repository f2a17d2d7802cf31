"""Where metrics go besides `metrics.jsonl`: TensorBoard event files and Weights & Biases.

`metrics.jsonl` (`train.metrics.MetricsLog`) stays the source of truth: it is written first,
and the sinks receive the same rows afterwards. A sink is any object with `write(row)` and
`close()` (`MetricSink`); `open_sinks` builds the ones the `[logging]` section asks for:

- TensorBoard (`logging.tensorboard`, on by default): event files in `<run>/tensorboard`, one
  scalar per numeric value of a row, tagged with the row's key (`loss/<teacher>`,
  `heldout/cos/<teacher>`, `lr`, ...). Skipped, with one note, when the `tensorboard` package
  is not installed. On resume, events past the checkpoint's step are purged, as the JSONL rows
  are.
- W&B (`[logging.wandb]`, off by default): does nothing unless `enabled = true` *and* `wandb`
  is installed (a note says so otherwise). `mode = "offline"` writes the run under
  `<run>/wandb` without the network (`wandb sync` uploads it later). The W&B run id is derived
  from the run folder, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cache_format.errors import ConfigError
from cache_format.serde import check_choice, check_types

WANDB_MODES = ("online", "offline")
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
# Row fields that are bookkeeping, not curves.
_NOT_SCALARS = ("kind", "step")


@dataclass(frozen=True)
class WandbConfig:
    """`[logging.wandb]`: Weights & Biases, only when enabled and installed."""

    enabled: bool = False
    project: str = "dune-distill"
    entity: str | None = None
    name: str | None = None
    mode: str = "online"
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_types(self, "logging.wandb")
        check_choice(
            self.mode, WANDB_MODES, "logging.wandb.mode",
            hint="'offline' writes the run locally; upload it later with `wandb sync`",
        )
        if not self.project:
            raise ConfigError("logging.wandb.project: expected a project name, found ''")


@dataclass(frozen=True)
class LoggingConfig:
    """`[logging]`: the sinks that receive metrics besides metrics.jsonl."""

    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        check_types(self, "logging")


class MetricSink(Protocol):
    """Receives every metrics row after metrics.jsonl has it."""

    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric values as curves (bools, strings, `kind` and `step` left out)."""
    return {
        key: float(value)
        for key, value in row.items()
        if key not in _NOT_SCALARS and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


class TensorBoardSink:
    """Scalars into TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at steps the resumed run is about to log again.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=30)

    def write(self, row: dict[str, Any]) -> None:
        """One scalar per value, at the row's step."""
        for key, value in scalars(row).items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=int(row["step"]))
        if row.get("kind") == "eval":
            self.writer.flush()  # held-out rows are rare: a crash loses at most the train rows

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandbSink:
    """One W&B run per run folder (resumed with it), online or offline."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
            tags=list(cfg.tags), mode=cfg.mode, dir=str(run_dir), config=config,
            id=wandb_run_id(run_dir), resume="allow",
        )

    def write(self, row: dict[str, Any]) -> None:
        """The row's values at its step (W&B ignores steps lower than one it has seen)."""
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        """Finish the run (offline: its files are complete for `wandb sync`)."""
        self.run.finish()


def wandb_run_id(run_dir: Path) -> str:
    """A stable W&B id for a run folder, so that rerunning the same command resumes its run."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return f"{run_dir.name[:40]}-{digest}".replace("/", "-")


def installed(package: str) -> bool:
    """Whether `package` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def open_sinks(
    cfg: LoggingConfig, run_dir: str | Path, resume_step: int | None, config: dict[str, Any]
) -> list[MetricSink]:
    """The sinks `cfg` asks for and the environment allows; `config` is the run's config dict
    (W&B shows it). Main process only."""
    run_dir = Path(run_dir)
    sinks: list[MetricSink] = []
    if cfg.tensorboard:
        if installed("tensorboard"):
            sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR, resume_step))
        else:
            _note("logging.tensorboard: the tensorboard package is not installed; no event "
                  "files (pip install tensorboard, or set it to false)")
    if cfg.wandb.enabled:
        if installed("wandb"):
            sinks.append(WandbSink(cfg.wandb, run_dir, config))
        else:
            _note("logging.wandb: enabled, but the wandb package is not installed; nothing is "
                  "sent (pip install 'dune-distill[wandb]')")
    return sinks


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)
