"""`TeacherConfig`: which teacher to run, with which weights, under which name in the cache."""

from __future__ import annotations

import keyword
from dataclasses import dataclass
from pathlib import Path

from cache_format.errors import ConfigError
from cache_format.manifest import check_node_name
from cache_format.serde import PathStr, check_types
from precompute.teachers.specs import check_kind, get_teacher_spec, split_kind

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
INIT_CHOICES = ("", "random")  # "": weights from checkpoint / pretrained; "random": on purpose


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher of a build.

    - `name`: the teacher's name in the cache (e.g. "dinov2").
    - `kind`: a registered name, `timm:<model>` or `factory:<module>:<function>`.
    - `domain`: the data domain it belongs to (data-sharing strategies); "" means the kind's
      default (`effective_domain`).
    - `checkpoint`: a local `.pth` / `.pt` / `.bin` / `.safetensors` file; None means random
      init (seeded with `init_seed`, so that two processes build identical weights) or, with
      `pretrained=True`, a hub download for online users.
    - `init`: "random" says that random weights are wanted (a stand-in, a test). A build
      refuses a real architecture (a registered kind with published weights, or `timm:`) with
      neither checkpoint nor pretrained unless `init = "random"` (`check_weights_source`), so
      that a forgotten checkpoint never spends a build on noise.
    - `embed_dim` / `depth` / `num_heads`: architecture overrides, for tiny random-init
      stand-ins of the real architectures in tests and the demo.
    """

    name: str
    kind: str
    domain: str = ""
    checkpoint: PathStr | None = None
    pretrained: bool = False
    init_seed: int = 0
    init: str = ""
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        where = f"TeacherConfig({self.name!r})" if isinstance(self.name, str) else "TeacherConfig"
        check_types(self, where)
        check_node_name(self.name, f"{where}.name")  # it names the teacher's cache groups
        if not self.kind:
            raise ConfigError(f"{where}.kind: expected a teacher kind, found {self.kind!r}")
        self._check_kind(where)
        if self.domain:  # "" means the kind's default domain
            check_node_name(self.domain, f"{where}.domain")
        if self.checkpoint is not None:
            if Path(self.checkpoint).suffix.lower() not in CHECKPOINT_SUFFIXES:
                raise ConfigError(
                    f"{where}.checkpoint: expected a file ending in "
                    f"{', '.join(CHECKPOINT_SUFFIXES)}, found {self.checkpoint!r}"
                )
        if self.pretrained and self.checkpoint is not None:
            raise ConfigError(
                f"{where}.pretrained: set either checkpoint (a local file) or pretrained=true "
                f"(a hub download), not both; found checkpoint={self.checkpoint!r}"
            )
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"{where}.init: expected \"random\" or nothing, found {self.init!r}")
        if self.init == "random" and (self.checkpoint is not None or self.pretrained):
            raise ConfigError(
                f"{where}.init: \"random\" contradicts "
                + (f"checkpoint={self.checkpoint!r}" if self.checkpoint else "pretrained=true"),
                hint="drop init for trained weights, or drop the checkpoint for random ones",
            )
        if not 0 <= self.init_seed < 2**63:
            raise ConfigError(
                f"{where}.init_seed: expected 0 <= seed < 2**63, found {self.init_seed}"
            )
        for field in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(
                    f"{where}.{field}: expected a positive int or None, found {value!r}"
                )
        if (
            self.embed_dim is not None
            and self.num_heads is not None
            and self.embed_dim % self.num_heads
        ):
            raise ConfigError(
                f"{where}.embed_dim: expected a multiple of num_heads={self.num_heads}, "
                f"found {self.embed_dim}"
            )
        if self.pretrained and self.has_overrides:
            raise ConfigError(
                f"{where}.pretrained: hub weights are full size and cannot fill an architecture "
                f"with overrides (embed_dim/depth/num_heads); drop the overrides or pretrained"
            )

    def _check_kind(self, where: str) -> None:
        prefix, rest = split_kind(self.kind)
        if prefix == "timm" and not rest:
            raise ConfigError(
                f"{where}.kind: expected 'timm:<timm model name>', found {self.kind!r}"
            )
        check_kind(self.kind)  # RegistryError listing the valid kinds
        if prefix == "factory":
            module, sep, function = rest.rpartition(":")
            if (
                not sep
                or not all(part.isidentifier() for part in module.split("."))
                or not function.isidentifier()
                or keyword.iskeyword(function)
            ):
                raise ConfigError(
                    f"{where}.kind: expected 'factory:<dotted.module>:<function>', "
                    f"found {self.kind!r}"
                )

    @property
    def has_overrides(self) -> bool:
        """True when any of embed_dim / depth / num_heads is set."""
        return any(v is not None for v in (self.embed_dim, self.depth, self.num_heads))

    @property
    def where(self) -> str:
        """How error messages name this config."""
        return f"TeacherConfig({self.name!r})"

    def check_weights_source(self) -> None:
        """Refuse what a build would silently get wrong about the weights (called by the build's
        pre-flight, so `--dry-run` says it too): a checkpoint that is not a readable file, and a
        real architecture with no weights at all unless `init = "random"` says so."""
        if self.checkpoint is not None:
            path = Path(self.checkpoint)
            if not path.is_file():
                found = "a folder" if path.is_dir() else "nothing"
                raise ConfigError(
                    f"{self.where}.checkpoint: expected a weights file at {str(path)!r}, "
                    f"found {found}",
                    hint="fix the path (relative paths are taken from the config file's folder)",
                )
            return
        if self.pretrained or self.init == "random" or split_kind(self.kind)[0] == "factory":
            return  # hub weights, random on purpose, or a factory that loads its own
        prefix, _ = split_kind(self.kind)
        if prefix == "timm" or get_teacher_spec(self.kind).checkpoint_file:
            raise ConfigError(
                f"{self.where}.checkpoint: kind {self.kind!r} is a real architecture but no "
                "checkpoint is set, so the build would run it with random weights",
                hint='set checkpoint to the weights file, pretrained = true, or init = "random" '
                "if random weights are what you want",
            )

    def effective_domain(self) -> str:
        """`domain`, or the kind's default domain when left empty.

        Open-ended kinds (`timm:`, `factory:`) have no default domain: their spec is not asked,
        so that parsing a config (a cache's stored one included) never imports a factory.
        """
        if self.domain or split_kind(self.kind)[0]:
            return self.domain
        return get_teacher_spec(self.kind).domain
