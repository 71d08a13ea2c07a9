"""Stage 2, fit: labels and per-layer capacities under a memory target, chosen by measurement."""
