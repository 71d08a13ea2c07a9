"""Greedy generation from a kvcompile artifact's ONNX graphs: onnxruntime, numpy, tokenizers.

    python examples/ort_generate.py ARTIFACT --prompt "The capital of France is" --max-new-tokens 32

No torch and no kvcompile: every ``kvcompile`` node in the graphs carries its reference body as
a model-local ONNX function, so stock onnxruntime runs them. The loop below is all a driver in
any language needs (docs/ONNX.md lists every input and output):

1. ``prefill.onnx``: ``input_ids [1, T]`` -> ``logits [1, V]`` (last position) and the cache
   state ``present.*``;
2. ``decode.onnx``, once per token: ``input_ids [1, 1]``, ``past_length [1]`` (tokens already
   in the cache) and the state as ``past.*`` -> ``logits`` and the next state.

It feeds the state back as plain arrays; ``kvcompile.runtime.load(DIR, backend="onnx")`` binds
the same buffers as input and output instead, so nothing is copied. This script does not check
the artifact's checksums (``kvcompile run`` does).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def stop_tokens(artifact: Path) -> set[int]:
    config = json.loads((artifact / "generation_config.json").read_text(encoding="utf-8"))
    eos = config.get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}


def generate(artifact: Path, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    prefill = ort.InferenceSession(str(artifact / "onnx" / "prefill.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(artifact / "onnx" / "decode.onnx"), options,
                                  providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    eos = stop_tokens(artifact)
    prompt_ids = tokenizer.encode(prompt).ids

    names = [output.name for output in prefill.get_outputs()]  # logits, then present.*
    logits, *state = prefill.run(None, {"input_ids": np.array([prompt_ids], dtype=np.int64)})
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(np.argmax(logits[0]))
        if token in eos:
            break
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        feed = {"input_ids": np.array([[token]], dtype=np.int64),
                "past_length": np.array([len(prompt_ids) + len(tokens) - 1], dtype=np.int64)}
        feed.update({name.replace("present.", "past.", 1): value
                     for name, value in zip(names[1:], state, strict=True)})
        logits, *state = decode.run(None, feed)
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="artifact directory built by kvcompile build")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ids", action="store_true", help="print the token ids, not the text")
    args = parser.parse_args()
    tokens, text = generate(args.artifact, args.prompt, args.max_new_tokens)
    print(json.dumps(tokens) if args.ids else text)


if __name__ == "__main__":
    main()
