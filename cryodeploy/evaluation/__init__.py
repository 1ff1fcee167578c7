"""Denoising quality: evaluation data, metrics against baselines, half-set evaluation, red flags,
the report."""
