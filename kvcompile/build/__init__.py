"""Stage 3, build: the static-budget artifact (permuted weights, plan, ONNX graphs, manifest)."""
