"""Graph passes: torch head permutation and the budgeted-attention swap."""
from kvcompile.passes.attention import InstallBudgetedAttention
from kvcompile.passes.base import CompiledModel, Pass, run_passes
from kvcompile.passes.permute import PermuteHeads

DEFAULT_PASSES: tuple[Pass, ...] = (PermuteHeads(), InstallBudgetedAttention())

__all__ = ["CompiledModel", "Pass", "run_passes", "PermuteHeads", "InstallBudgetedAttention", "DEFAULT_PASSES"]
