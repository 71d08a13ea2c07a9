"""examples/ort_generate.mjs: the artifact's graphs driven from Node.js with onnxruntime-node,
as docs/ONNX.md tells a new user to (rows of different lengths in one batched cache, updated
in place). Reference: the torch runtime's ``generate`` (what ``kvcompile run`` runs) on the
same token ids. Skips only when node or onnxruntime-node is not installed
(``make node-example`` installs it into examples/node/).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kvcompile.runtime import load

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ort_generate.mjs"
NODE = shutil.which("node")
ORT_NODE = ROOT / "examples" / "node" / "node_modules" / "onnxruntime-node" / "package.json"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(not ORT_NODE.is_file(),
                       reason="onnxruntime-node is not installed (make node-example)"),
]


def test_node_generates_the_python_runtimes_tokens_past_every_capacity(
        tiny_onnx_artifact: Path) -> None:
    engine = load(tiny_onnx_artifact)
    # token ids, as the script takes them (the tiny artifact's tokenizer has no real vocabulary)
    prompts = [[5, 9], [40, 41, 7, 7, 19, 23, 60], [12, 8, 30, 31, 32, 33, 70, 71, 72, 50, 51,
                                                    52, 53, 54, 55]]
    capacity = max(layer.layout.capacity for layer in engine.plan.layers if layer.layout)
    command = [NODE, str(SCRIPT), str(tiny_onnx_artifact), "--max-new-tokens", "40"]
    for prompt in prompts:
        command += ["--ids", ",".join(map(str, prompt))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [engine.generate(prompt, max_new_tokens=40).token_ids for prompt in prompts]
    assert found == expected
    assert all(len(p) + len(e) > capacity + 4 for p, e in zip(prompts, expected, strict=True))
