"""Report rendering: output paths, Markdown content, PNG plot, atomic JSON round trip."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from kvcompile.eval.report import (
    ReportError,
    format_proportion,
    load_report,
    plot_accuracy,
    render_markdown,
    report_paths,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

REPORT: dict[str, Any] = {
    "format": "kvcompile-report/1",
    "kvcompile_version": "0.1.0",
    "created_with": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.23.0"},
    "seed": 7,
    "artifact": {
        "path": "artifact",
        "model_id": "default",
        "fingerprint": "sha256:feedbeef",
        "policy": "profiled",
    },
    "kv_memory": {"context": 4096, "artifact_bytes": 2048, "baseline_bytes": 16384, "ratio": 0.125},
    "wall_time_s": 123.4,
    "tasks": [
        {
            "task": "passkey",
            "length": 4096,
            "n": 20,
            "baseline": {"correct": 20, "accuracy": 1.0, "ci95": [0.839, 1.0], "wall_time_s": 10.2},
            "artifact": {
                "correct": 19,
                "accuracy": 0.95,
                "ci95": [0.861, 0.986],
                "wall_time_s": 8.1,
            },
            "memory_ratio": 0.125,
        },
        {
            "task": "passkey",
            "length": 1024,
            "n": 20,
            "baseline": {"correct": 20, "accuracy": 1.0, "ci95": [0.839, 1.0]},
            "artifact": {"correct": 20, "accuracy": 1.0, "ci95": [0.839, 1.0]},
            "memory_ratio": 0.5,
        },
        {
            "task": "multikey",
            "length": 4096,
            "n": 10,
            "baseline": {"correct": 7, "accuracy": 0.7},
            "artifact": {"correct": 5, "accuracy": 0.5},
            "memory_ratio": 0.125,
        },
        {
            "task": "continuation",
            "length": 4096,
            "n": 4,
            "tokens": 256,
            "baseline": {"nll": 2.31, "wall_time_s": 5.0},
            "artifact": {"nll": 2.35, "wall_time_s": 4.0},
            "nll_increase": 0.0173,
            "nll_increase_ci95": [0.0051, 0.0295],
            "kl": 0.021,
            "kl_ci95": [0.015, 0.027],
            "agreement": 0.93,
            "agreement_n": 256,
            "agreement_ci95": [0.89, 0.96],
            "memory_ratio": 0.125,
        },
    ],
}


def report() -> dict[str, Any]:
    return copy.deepcopy(REPORT)


@pytest.mark.parametrize(
    "given", ["out/report.json", "out/report", "out/report.md", "out/report.PNG"]
)
def test_report_paths_from_file_or_stem(given: str) -> None:
    paths = report_paths(given)
    assert (paths.json, paths.markdown, paths.png) == (
        Path("out/report.json"),
        Path("out/report.md"),
        Path("out/report.png"),
    )


def test_report_paths_keep_other_dots_and_use_directories(tmp_path: Path) -> None:
    assert report_paths("run.v2").json == Path("run.v2.json")
    assert report_paths(tmp_path).markdown == tmp_path / "report.md"


def test_format_proportion() -> None:
    assert format_proportion(0.95, 0.861, 0.986, 20) == "95.0% [86.1, 98.6] (n=20)"
    assert format_proportion(None, None, None, 20) == "—"


def test_markdown_contains_the_numbers() -> None:
    md = render_markdown(report())
    for needle in [
        "`default`",
        "sha256:feedbeef",
        "profiled",
        "12.5%",
        "4,096 tokens",
        "2.0 KiB",
        "16.0 KiB",
        "123.4 s",
        "seed**: 7",
        "torch 2.13.0",
        "transformers 5.23.0",
        "kvcompile 0.1.0",
        "### passkey",
        "### multikey",
        "95.0% [86.1, 98.6] (n=20)",
        "100.0% [83.9, 100.0] (n=20)",
        "+5.0 pp",
        "10.2 s / 8.1 s",
        # multikey has no stored interval: Wilson from the counts (7/10 -> [39.7, 89.2])
        "70.0% [39.7, 89.2] (n=10)",
        "50.0% [23.7, 76.3] (n=10)",
        "+20.0 pp",
        "## Continuation",
        "4 × 256",
        "2.3100",
        "2.3500",
        "+1.73% [0.51, 2.95]",
        "0.0210 [0.0150, 0.0270]",
        "93.0% [89.0, 96.0] (n=256)",
    ]:
        assert needle in md, needle
    # lengths are listed in increasing order within a task
    assert md.index("| 1024 |") < md.index("| 4096 | 100.0%")


def test_markdown_tolerates_sparse_reports() -> None:
    md = render_markdown({"format": "kvcompile-report/1", "tasks": []})
    assert "no task rows" in md
    md = render_markdown(
        {
            "format": "kvcompile-report/1",
            "tasks": [
                {
                    "task": "continuation",
                    "length": 8,
                    "baseline": {"nll": 1.0},
                    "artifact": {"nll": 1.1},
                }
            ],
        }
    )
    assert "+10.00%" in md


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_plot_accuracy_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "acc.png"
    plot_accuracy(report(), path)
    _check_png(path)


def test_plot_without_accuracy_tasks(tmp_path: Path) -> None:
    rep = report()
    rep["tasks"] = [t for t in rep["tasks"] if t["task"] == "continuation"]
    plot_accuracy(rep, tmp_path / "empty.png")
    _check_png(tmp_path / "empty.png")


def test_write_report_writes_three_files_atomically(tmp_path: Path) -> None:
    rep = report()
    paths = write_report(rep, tmp_path / "sub" / "report.json")
    assert json.loads(paths.json.read_text()) == rep
    assert "95.0% [86.1, 98.6] (n=20)" in paths.markdown.read_text()
    _check_png(paths.png)
    assert sorted(p.name for p in paths.json.parent.iterdir()) == [
        "report.json",
        "report.md",
        "report.png",
    ]  # no temp files left behind
    assert load_report(tmp_path / "sub" / "report") == rep
    umask = os.umask(0)
    os.umask(umask)
    assert paths.json.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_report_replaces_and_keeps_json_strict(tmp_path: Path) -> None:
    rep = report()
    write_report(rep, tmp_path / "r")
    rep["tasks"][3]["kl"] = math.nan
    rep["tasks"][3]["kl_ci95"] = (0.1, 0.2)
    paths = write_report(rep, tmp_path / "r.md")
    text = paths.json.read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["tasks"][3]["kl"] is None and data["tasks"][3]["kl_ci95"] == [0.1, 0.2]


def test_failed_render_writes_nothing(tmp_path: Path) -> None:
    rep = report()
    rep["tasks"][0]["weird"] = object()
    with pytest.raises(TypeError):
        write_report(rep, tmp_path / "report")
    assert list(tmp_path.iterdir()) == []


def test_load_report_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="cannot read"):
        load_report(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_report(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"format": "kvcompile-report/0", "tasks": []}))
    with pytest.raises(ReportError, match="format"):
        load_report(tmp_path / "old.json")
