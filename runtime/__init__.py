"""The static-budget runtime: budgeted cache, custom ops, generation loop."""
