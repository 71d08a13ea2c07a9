"""Stage 4, eval: generated and user cases, the artifact against the uncompressed model, reports."""
