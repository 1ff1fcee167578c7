"""Inference: tile plans, batched tiled execution, job planning and claims, the file runner,
:class:`~cryodeploy.inference.denoiser.Denoiser`."""
