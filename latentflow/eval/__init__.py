"""Evaluation: feature networks, feature statistics and distances, reference statistics, sampler sweeps."""
