"""Graph passes: torch (head permutation, attention swap)."""
