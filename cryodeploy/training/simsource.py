"""Training batches simulated on the fly (:mod:`cryodeploy.imaging.simulate`), on the training device.

Each step simulates fresh micrographs, normalizes each whole micrograph exactly as the runner's
image contract does (the noisy image's robust statistics, :func:`~cryodeploy.imaging.normalize.
norm_stats_torch`, applied to the noisy image and to its exact clean target alike) and cuts
random crops. Step ``k`` of seed ``s`` depends only on ``(s, k)`` and the source, so a run is
reproducible and can start at any step. On CUDA a background thread simulates the next batch
on a side stream while the current one trains. With ``redraws`` = r, each simulation serves r + 1
steps: its own, then r more of the same scenes at fresh doses (log-uniform over the simulator's
range) with fresh counts and crops, which is exact and several times cheaper than new scenes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.normalize import NormSpec, norm_stats_torch

if TYPE_CHECKING:
    import torch

    from cryodeploy.imaging.simulate import SimConfig

__all__ = ["SimSource", "batch_psnr", "normalized_pair", "sim_batches", "sim_images", "step_seed"]


def step_seed(seed: int, step: int) -> int:
    """The simulation seed of training step ``step`` of a run seeded ``seed`` (a 31-bit integer)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0] >> 1)


@dataclass(frozen=True)
class SimSource:
    """Supervised batches from simulation: ``batch`` crops of ``crop`` px, ``crops_per_image`` from each
    simulated micrograph of ``sim.shape``; each simulation redrawn at new doses for ``redraws`` more
    steps."""

    sim: SimConfig
    crop: int = 256
    crops_per_image: int = 4
    batch: int = 32
    seed: int = 0
    normalization: NormSpec = field(default_factory=NormSpec)
    redraws: int = 0

    def __post_init__(self) -> None:
        h, w = self.sim.shape
        if not 1 <= self.crop <= min(h, w):
            raise ConfigError(f"simulated crop {self.crop} px does not fit the simulated {w}x{h} micrographs")
        if self.crops_per_image < 1 or self.batch < 1 or self.batch % self.crops_per_image:
            raise ConfigError(f"batch {self.batch} is not a positive multiple of crops_per_image "
                              f"{self.crops_per_image}")
        if not 0 <= self.redraws <= 64:
            raise ConfigError(f"redraws {self.redraws}: expected an integer from 0 to 64")

    @property
    def images_per_step(self) -> int:
        """Micrographs simulated for one batch."""
        return self.batch // self.crops_per_image

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (recorded in the checkpoints it trains)."""
        return {"sim": self.sim.to_dict(), "crop": self.crop, "crops_per_image": self.crops_per_image,
                "batch": self.batch, "seed": self.seed, "normalization": self.normalization.to_dict(),
                "redraws": self.redraws}


def normalized_pair(noisy: torch.Tensor, clean: torch.Tensor, spec: NormSpec | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H, W] noisy and clean images, both mapped by the noisy image's robust statistics (``spec``,
    default :class:`NormSpec`); [N, 1, H, W]."""
    center, scale = norm_stats_torch(noisy, spec or NormSpec())
    c, s = center.view(-1, 1, 1), scale.view(-1, 1, 1)
    x = ((noisy.double() - c) / s).float()
    y = ((clean.double() - c) / s).float()
    return x[:, None], y[:, None]


def sim_images(sim: SimConfig, n: int, seed: int, device: str | torch.device = "cpu",
               spec: NormSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` whole simulated micrographs of ``seed``, normalized as the runner does: (noisy, clean),
    [N, 1, H, W] each."""
    from cryodeploy.imaging.simulate import simulate

    b = simulate(sim, n, seed, device=device)
    return normalized_pair(b.noisy, b.clean, spec)


def _crops(x: torch.Tensor, y: torch.Tensor, size: int, per_image: int, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    n, _, h, w = x.shape
    oy = torch.randint(0, h - size + 1, (n * per_image,), generator=gen).tolist()
    ox = torch.randint(0, w - size + 1, (n * per_image,), generator=gen).tolist()
    idx = [i // per_image for i in range(n * per_image)]
    xs = torch.stack([x[i, :, a:a + size, b:b + size] for i, a, b in zip(idx, oy, ox, strict=True)])
    ys = torch.stack([y[i, :, a:a + size, b:b + size] for i, a, b in zip(idx, oy, ox, strict=True)])
    return xs, ys


def _make_batch(source: SimSource, step: int, device: torch.device, library: Any,
                cache: dict[int, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch; ``cache`` keeps the last simulation for its redraws."""
    import torch

    from cryodeploy.imaging.simulate import simulate

    group, redraw = divmod(step, source.redraws + 1)
    if group not in cache:
        cache.clear()
        first = group * (source.redraws + 1)
        cache[group] = simulate(source.sim, source.images_per_step, step_seed(source.seed, first),
                                device=device, library=library)
    b = cache[group]
    s = step_seed(source.seed, step)
    if redraw == 0:
        noisy, clean = b.noisy, b.clean
    else:
        lo, hi = source.sim.dose_e_per_px
        rng = np.random.default_rng(s)
        dose = np.exp(rng.uniform(np.log(lo), np.log(hi), len(b.meta)))
        old = np.array([m["dose_e_per_px"] for m in b.meta])
        noisy, clean = b.redraw(torch.from_numpy(dose / old), s)
    x, y = normalized_pair(noisy, clean, source.normalization)
    gen = torch.Generator().manual_seed(s)
    return _crops(x, y, source.crop, source.crops_per_image, gen)


def sim_batches(source: SimSource, device: str | torch.device = "cpu", start: int = 0, stride: int = 1,
                prefetch: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input, target) batches [B, 1, crop, crop] on ``device``: steps ``start + i * stride``.

    ``prefetch`` (default: on CUDA) simulates the next batch in a background thread on a side stream.
    """
    import torch

    from cryodeploy.imaging.simulate import build_library

    dev = torch.device(device)
    library = build_library(source.sim)
    cache: dict[int, Any] = {}
    if not (dev.type == "cuda" if prefetch is None else prefetch):
        step = start
        while True:
            yield _make_batch(source, step, dev, library, cache)
            step += stride
    q: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        step = start
        try:
            while not stop.is_set():
                if stream is not None:
                    with torch.cuda.stream(stream):
                        item = _make_batch(source, step, dev, library, cache)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    item, event = _make_batch(source, step, dev, library, cache), None
                while not stop.is_set():
                    try:
                        q.put((item, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += stride
        except BaseException as err:  # handed to the consumer, which re-raises it
            q.put((err, None))

    thread = threading.Thread(target=produce, name="sim-batches", daemon=True)
    thread.start()
    try:
        while True:
            item, event = q.get()
            if isinstance(item, BaseException):
                raise item
            if event is not None:
                current = torch.cuda.current_stream(dev)
                current.wait_event(event)
                for t in item:
                    t.record_stream(current)
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


def batch_psnr(pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image [N, 1, H, W] against its clean image, over the clean image's max - min."""
    dims = tuple(range(1, clean.ndim))
    err = ((pred.double() - clean.double()) ** 2).mean(dim=dims)
    rng = clean.double().amax(dim=dims) - clean.double().amin(dim=dims)
    return 10.0 * (rng * rng / err).log10()
