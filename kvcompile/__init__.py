"""kvcompile: compile the KV cache of an LLM into a static-budget artifact."""
__version__ = "0.1.0"
