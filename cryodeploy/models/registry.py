"""The architecture registry and :class:`ModelSpec`, the JSON-serialisable description of a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.contract import FrameContract
from cryodeploy.imaging.normalize import NormSpec

if TYPE_CHECKING:
    import torch

__all__ = ["ARCHITECTURES", "Architecture", "ModelSpec", "build_model", "get_architecture"]


@dataclass(frozen=True)
class Architecture:
    """A registered network: how to build it and its tiling geometry for given parameters."""

    name: str
    build: Callable[..., torch.nn.Module]
    defaults: dict[str, Any]
    receptive_radius: Callable[[dict[str, Any]], int]
    stride: Callable[[dict[str, Any]], int]
    description: str
    #: inclusive integer range of each parameter: a config outside it is refused before any allocation
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: spatial dimensions of its input: 2 (images, [N,1,H,W]) or 3 (volumes, [N,1,D,H,W])
    ndim: int = 2


def _cnn3(**params: Any) -> torch.nn.Module:
    from cryodeploy.models.cnn3 import CNN3

    return CNN3(**params)


def _unet(**params: Any) -> torch.nn.Module:
    from cryodeploy.models.unet import UNet

    return UNet(**params)


def _unet3d(**params: Any) -> torch.nn.Module:
    from cryodeploy.models.unet3d import UNet3D

    return UNet3D(**params)


def _unet_radius(p: dict[str, Any]) -> int:
    from cryodeploy.models.unet import unet_receptive_radius

    return unet_receptive_radius(int(p["depth"]))


ARCHITECTURES: dict[str, Architecture] = {
    "cnn3": Architecture(
        name="cnn3",
        build=_cnn3,
        defaults={"channels": 16},
        receptive_radius=lambda p: 3,
        stride=lambda p: 1,
        description="the seeds' 3-layer CNN: 1->16->16->1, 3x3, ReLU, zero 'same' padding (2,625 parameters)",
        bounds={"channels": (1, 1024)},
    ),
    "unet": Architecture(
        name="unet",
        build=_unet,
        defaults={"base_channels": 32, "depth": 3, "max_channels": 0},
        receptive_radius=_unet_radius,
        stride=lambda p: 2 ** int(p["depth"]),
        description="small U-Net (Topaz-Denoise unet-small spirit): max-pool down, nearest up, skip concat; "
                    "channels double per level, up to max_channels (0: no cap)",
        bounds={"base_channels": (1, 256), "depth": (1, 6), "max_channels": (0, 4096)},
    ),
    "unet3d": Architecture(
        name="unet3d",
        build=_unet3d,
        defaults={"base_channels": 16, "depth": 2},
        receptive_radius=_unet_radius,
        stride=lambda p: 2 ** int(p["depth"]),
        description="small 3-D U-Net for tomograms: the unet with 3x3x3 convs, 2x2x2 max-pool, nearest up",
        bounds={"base_channels": (1, 128), "depth": (1, 5)},
        ndim=3,
    ),
}


def get_architecture(name: str) -> Architecture:
    """Look up a registered architecture by name."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}, expected one of {', '.join(sorted(ARCHITECTURES))}"
        ) from None


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and use it correctly (stored as the checkpoint's JSON).

    ``receptive_radius`` is the number of pixels (voxels) on each side, along every axis, that
    influence one output pixel; ``stride`` is the total downsampling, to which tile offsets must
    align; ``ndim`` is 2 for image models and 3 for volume models.
    """

    architecture: str
    params: dict[str, Any] = field(default_factory=dict)
    normalization: NormSpec = field(default_factory=NormSpec)
    noise: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arch = get_architecture(self.architecture)
        unknown = set(self.params) - set(arch.defaults)
        if unknown:
            raise ConfigError(f"architecture {self.architecture!r} has no parameters {sorted(unknown)}")
        params = {**arch.defaults, **self.params}
        for key, (low, high) in arch.bounds.items():
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{self.architecture} parameter {key}={value!r}, "
                                  f"expected an integer from {low} to {high}")
        object.__setattr__(self, "params", params)

    @property
    def receptive_radius(self) -> int:
        """Pixels on each side that influence one output pixel."""
        return get_architecture(self.architecture).receptive_radius(self.params)

    @property
    def stride(self) -> int:
        """Total downsampling factor; tile offsets and padded sizes align to it."""
        return get_architecture(self.architecture).stride(self.params)

    @property
    def ndim(self) -> int:
        """Spatial dimensions of the model's input: 2 (images) or 3 (volumes)."""
        return get_architecture(self.architecture).ndim

    @property
    def contract(self) -> FrameContract:
        """How this model sees an image: its normalization and stride (:mod:`cryodeploy.imaging.contract`)."""
        return FrameContract(self.normalization, self.stride, self.ndim)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (format-tagged)."""
        return {
            "format": "cryodeploy-model/1",
            "architecture": self.architecture,
            "params": dict(self.params),
            "receptive_radius": self.receptive_radius,
            "stride": self.stride,
            "ndim": self.ndim,
            "normalization": self.normalization.to_dict(),
            "noise": dict(self.noise),
            "training": dict(self.training),
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; rejects unknown formats, and any field the model config schema
        (:class:`~cryodeploy.models.specschema.ModelDoc`) refuses."""
        from cryodeploy.files import validated
        from cryodeploy.models.specschema import ModelDoc

        if not isinstance(d, dict) or d.get("format") != "cryodeploy-model/1":
            found = d.get("format") if isinstance(d, dict) else f"a JSON {type(d).__name__}"
            raise ConfigError(f"model config format {found!r}, expected 'cryodeploy-model/1'")
        doc = validated(d, ModelDoc, "model config", ConfigError)
        spec = cls(
            architecture=doc.architecture,
            params=dict(doc.params),
            normalization=NormSpec.from_dict(doc.normalization),
            noise=dict(doc.noise),
            training=dict(doc.training),
            versions=dict(doc.versions),
        )
        for key in ("receptive_radius", "stride", "ndim"):
            said, has = getattr(doc, key), getattr(spec, key)
            if said is not None and said != has:
                raise ConfigError(f"model config says {key}={said}, but {spec.architecture} has {has}")
        return spec


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Construct the (untrained) network described by ``spec``."""
    return get_architecture(spec.architecture).build(**spec.params)
