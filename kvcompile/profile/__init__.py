"""Stage 1, profile: calibration prompts, per-KV-head statistics, layer sensitivity, the Profile file."""
