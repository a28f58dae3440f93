"""The logit lens and its entropies: types, the per-mode lenses, the measures of a batch,
the fused GPU kernels and the study's own algorithm (a baseline and test oracle)."""
