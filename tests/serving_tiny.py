"""A tiny artifact that serves text: a tiny llama with a character-level tokenizer and a chat
template, for the server's tests (``tests/test_server.py``, ``tests/test_serve_process.py``)."""
from __future__ import annotations

from pathlib import Path

from kvcompile.build.artifact import build_artifact
from kvcompile.models import load_model
from tests.test_bench import save_char_tokenizer
from tests.test_profile_io import build_profile
from tests.tiny import tiny_hf_model

CONTEXT = 128
MODEL_NAME = "model"  # the artifact's model name: its source directory's
# one line per message, the role in angle brackets; every character is in the tokenizer
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def build_serving_artifact(root: Path, onnx: bool = False) -> Path:
    """Build the tiny artifact under ``root`` and return its directory."""
    source = root / MODEL_NAME
    tiny_hf_model("llama", seed=6, vocab_size=100).save_pretrained(source)
    save_char_tokenizer(source)
    loaded = load_model(str(source), reuse=False)
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    profile = build_profile(loaded)[0]
    build_artifact(loaded, profile, root / "artifact", max_context=CONTEXT, onnx=onnx)
    return root / "artifact"
