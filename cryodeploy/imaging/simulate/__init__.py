"""Realistic cryo-EM micrographs with exact clean targets, simulated in torch (CPU or CUDA).

Physics (weak-phase object, one defocus per image):

* **Particles** are pseudo-atom models: point clouds in A, sampled uniformly inside procedural
  shapes (barrels, rings, short helices, globular unions of sub-blobs, elongated complexes) or in
  proportion to the density of a real 3-D map (:func:`model_from_map`). Each image uses one to
  three species of the library, uniformly random orientations (SO(3)) and positions (empty,
  sparse or crowded fields, with or without overlap); some fields hold long helical filaments
  crossing the whole field. A point carries ``dV * volume / n_points`` (V*A^3), ``dV`` being the
  excess potential of protein over ice; bilinear scatter-add onto the pixel grid divided by the
  pixel area gives the projected potential in V*A, blurred in Fourier space by the pseudo-atom
  size ``exp(-2 pi^2 sigma^2 s^2)``.
* **Sample**: ice of a smoothly varying thickness t (intensity loss ``exp(-t / lambda)``, lambda the
  mean free path, 3500 A at 300 kV scaled by beta^2), a weak amorphous-water texture of the
  projected potential (a random field with the structure factor of amorphous ice, peak at 3.7 A,
  amplitude ~ sqrt(t)), in some fields a carbon film with a sharp curved edge (excess potential
  5 V x its thickness, tapered over 3-20 A at the edge, and a fine amorphous texture; it is darker
  through the amplitude-contrast term) and contamination blobs (ice lumps 1000-6000 A thick,
  strongly absorbing: transmission only, no phase).
* **Optics**: phase ``phi = sigma_e * V`` (rad; sigma_e the relativistic interaction constant),
  CTF ``-(sqrt(1 - w^2) sin chi + w cos chi) * exp(-B s^2 / 4)``, ``chi = pi lambda df s^2 -
  pi/2 Cs lambda^3 s^4 + phase_shift`` with astigmatic defocus (underfocus positive).
  Intensity ``I = dose * T * (1 + 2 * CTF (*) phi)``, T the product of the transmissions.
* **Detector**: a counting camera: the expected image is blurred by the pixel-aperture MTF
  ``sinc(fx) sinc(fy)`` (cycles/pixel) times an optional Gaussian, then Poisson counts (white
  noise). Optional gain: a gain-corrected counting image, ``Poisson(g * rate) / g`` for a fixed
  flat-field-like efficiency ``g``: its expectation is still ``rate``, so the clean target never
  contains the gain, only the noise variance (``rate / g``) does. Optional "interpolated sum":
  counts on a (H+1, W+1) grid resampled by bilinear interpolation at a sub-pixel shift (each
  axis 0.25-0.75 px), as in a motion-corrected sum: neighbouring pixels' noise correlates by
  ``a(1-a) / ((1-a)^2 + a^2)``, 0.3-0.5 (``noise_corr_x`` / ``noise_corr_y`` in the metadata).

``clean`` is the exact expectation of ``noisy`` (same units: counts per pixel). Image ``i`` of
seed ``s`` depends only on ``(s, i)`` and the config: scalar parameters come from a numpy
generator seeded with ``[s, i]`` (the same on every device), arrays from per-image
``torch.Generator`` s on the device; the scatter is exact integer (fixed-point) arithmetic on
CUDA, so results are deterministic there too. Not modelled: per-particle defocus, multiple
scattering, beam-induced motion blur, detector dead time and coincidence loss.
"""

from __future__ import annotations

from cryodeploy.imaging.simulate.config import SimConfig
from cryodeploy.imaging.simulate.optics import (
    ctf_2d,
    electron_wavelength,
    ice_mean_free_path,
    interaction_constant,
)
from cryodeploy.imaging.simulate.particles import (
    KINDS,
    POOL_POINTS,
    ModelLibrary,
    PseudoAtomModel,
    build_library,
    model_from_map,
    procedural_model,
)
from cryodeploy.imaging.simulate.render import SimBatch, simulate

__all__ = [
    "KINDS",
    "POOL_POINTS",
    "ModelLibrary",
    "PseudoAtomModel",
    "SimBatch",
    "SimConfig",
    "build_library",
    "ctf_2d",
    "electron_wavelength",
    "ice_mean_free_path",
    "interaction_constant",
    "model_from_map",
    "procedural_model",
    "simulate",
]
