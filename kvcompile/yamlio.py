"""Deterministic YAML writing and atomic file writes shared by every stage."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


class FlowList(list):
    """A list written on one line (numbers, short tuples)."""


class FlowDict(dict):
    """A mapping written on one line (one head's statistics)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))


def rounded(value: float, digits: int = 6) -> float:
    """Round to significant digits so files are byte-identical across runs and readable."""
    return float(f"{float(value):.{digits}g}")


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside the target then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
