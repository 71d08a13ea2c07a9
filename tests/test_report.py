"""Reports: the typed record's reader and writer (round trip, one-line errors naming the field),
output paths, Markdown content, PNG plot, atomic writes."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kvcompile.eval.render import format_proportion, plot_accuracy, render_markdown
from kvcompile.eval.report import (
    AccuracyRow,
    ContinuationRow,
    Report,
    ReportError,
    load_report,
    report_from_dict,
    report_paths,
    report_to_dict,
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
    """REPORT in its file form (a fresh copy to edit)."""
    return copy.deepcopy(REPORT)


def typed(data: dict[str, Any] | None = None) -> Report:
    return report_from_dict(report() if data is None else data)


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
    md = render_markdown(typed())
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
    md = render_markdown(typed({"format": "kvcompile-report/1", "tasks": []}))
    assert "no task rows" in md
    md = render_markdown(typed(
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
    ))
    assert "+10.00%" in md


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_plot_accuracy_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "acc.png"
    plot_accuracy(typed(), path)
    _check_png(path)


def test_plot_without_accuracy_tasks(tmp_path: Path) -> None:
    rep = report()
    rep["tasks"] = [t for t in rep["tasks"] if t["task"] == "continuation"]
    plot_accuracy(typed(rep), tmp_path / "empty.png")
    _check_png(tmp_path / "empty.png")


def test_write_report_writes_three_files_atomically(tmp_path: Path) -> None:
    rep = report()
    paths = write_report(typed(rep), tmp_path / "sub" / "report.json")
    assert json.loads(paths.json.read_text()) == rep  # the file form is kept, key for key
    assert "95.0% [86.1, 98.6] (n=20)" in paths.markdown.read_text()
    _check_png(paths.png)
    assert sorted(p.name for p in paths.json.parent.iterdir()) == [
        "report.json",
        "report.md",
        "report.png",
    ]  # no temp files left behind
    assert load_report(tmp_path / "sub" / "report") == typed(rep)
    umask = os.umask(0)
    os.umask(umask)
    assert paths.json.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_report_replaces_and_keeps_json_strict(tmp_path: Path) -> None:
    rep = typed()
    write_report(rep, tmp_path / "r")
    rows = list(rep.rows)
    rows[3] = replace(rows[3], kl=math.nan, kl_ci95=(0.1, 0.2))
    paths = write_report(replace(rep, rows=tuple(rows)), tmp_path / "r.md")
    text = paths.json.read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["tasks"][3]["kl"] is None and data["tasks"][3]["kl_ci95"] == [0.1, 0.2]
    again = load_report(paths.json).rows[3]  # a NaN reads back as absent
    assert isinstance(again, ContinuationRow) and again.kl is None and again.kl_ci95 == (0.1, 0.2)


def test_failed_render_writes_nothing(tmp_path: Path) -> None:
    rep = typed()
    weird = replace(rep.rows[0], memory_ratio=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        write_report(replace(rep, rows=(weird, *rep.rows[1:])), tmp_path / "report")
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


# ----------------------------------------------------------------------------- the record


def test_rows_are_typed_by_task_kind() -> None:
    rep = typed()
    assert [type(r) for r in rep.rows] == [AccuracyRow, AccuracyRow, AccuracyRow, ContinuationRow]
    passkey, cont = rep.rows[0], rep.rows[3]
    assert isinstance(passkey, AccuracyRow) and passkey.artifact.correct == 19
    assert passkey.artifact.estimate(passkey.n) == (0.95, 0.861, 0.986)
    assert isinstance(cont, ContinuationRow) and cont.nll_increase == 0.0173 and cont.kl_ci95 == (0.015, 0.027)
    assert rep.memory is not None and rep.memory.ratio == 0.125 and rep.memory.context == 4096
    assert rep.tasks == ["passkey", "multikey", "continuation"]
    assert rep.row("passkey", 1024) is rep.rows[1] and rep.row("passkey", 2048) is None
    # a team's answers are an accuracy row; a hand-written row with NLLs only is a continuation
    data = report()
    data["tasks"] = [{"task": "answers", "length": 900, "n": 3, "baseline": {"correct": 2},
                      "artifact": {"correct": 1}},
                     {"task": "my-text", "length": 900, "baseline": {"nll": 1.0}, "artifact": {"nll": 1.2}}]
    answers, text = typed(data).rows
    assert isinstance(answers, AccuracyRow) and answers.artifact.estimate(3).value == pytest.approx(1 / 3)
    assert isinstance(text, ContinuationRow) and text.measured_nll_increase() == pytest.approx(0.2)


def test_the_file_form_round_trips() -> None:
    rep = typed()
    assert report_to_dict(rep) == report()
    assert report_from_dict(report_to_dict(rep)) == rep
    # an older report: one sample count for every task
    old = report()
    old["settings"] = {"tasks": ["passkey", "continuation"], "lengths": [4096], "samples": 10}
    settings = typed(old).settings
    assert settings is not None and settings.samples == {"passkey": 10, "continuation": 10}


@pytest.mark.parametrize(("edit", "field", "message"), [
    (lambda r: r.pop("tasks"), "tasks", "missing"),
    (lambda r: r.update(tasks={}), "tasks", "expected a list"),
    (lambda r: r["tasks"][1].update(n="twenty"), "tasks[1].n", "expected an integer, got 'twenty'"),
    (lambda r: r["tasks"][1].update(n=-1), "tasks[1].n", "expected a number >= 0"),
    (lambda r: r["tasks"][0].pop("length"), "tasks[0].length", "missing"),
    (lambda r: r["tasks"][0]["artifact"].update(correct=21), "tasks[0].artifact.correct",
     "21 is more than n = 20"),
    (lambda r: r["tasks"][0]["artifact"].update(accuracy=1.5), "tasks[0].artifact.accuracy",
     "expected a number in [0, 1]"),
    (lambda r: r["tasks"][0]["artifact"].update(ci95=[0.9, 0.1]), "tasks[0].artifact.ci95",
     "expected lo <= hi"),
    (lambda r: r["tasks"][3].update(kl="low"), "tasks[3].kl", "expected a finite number, got 'low'"),
    (lambda r: r["tasks"][3].update(kl=math.inf), "tasks[3].kl", "expected a finite number"),
    (lambda r: r["tasks"][3].update(kl_ci95=[0.1]), "tasks[3].kl_ci95", "expected [lo, hi]"),
    (lambda r: r["tasks"][3].update(cases={"kl": [0.1, 0.2, 0.3]}), "tasks[3].cases.kl",
     "3 values for n = 4 cases"),
    (lambda r: r["tasks"][3].update(cases={"agreement": [1, 1, 1, 2]}), "tasks[3].cases.agreement[3]",
     "expected a number in [0, 1]"),
    (lambda r: r["kv_memory"].update(ratio="0.1"), "kv_memory.ratio", "expected a finite number"),
    (lambda r: r["kv_memory"].update(artifact_bytes=1.5), "kv_memory.artifact_bytes", "expected an integer"),
    (lambda r: r.update(seed=True), "seed", "expected an integer, got True"),
    (lambda r: r.update(created_with={"torch": 2}), "created_with.torch", "expected a string"),
    (lambda r: r.update(tasks=[7]), "tasks[0]", "expected a mapping"),
])
def test_a_bad_field_is_one_line_naming_it(tmp_path: Path, edit: Any, field: str, message: str) -> None:
    data = report()
    edit(data)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError) as info:
        load_report(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {field}: ") and message in text, text
    assert info.value.exit_code == 2


def test_memory_ratio_from_the_bytes_and_a_tampered_ratio() -> None:
    from kvcompile.eval.report import KVMemory

    assert KVMemory(ratio=0.125, artifact_bytes=125, baseline_bytes=1000).checked_ratio() == 0.125
    assert KVMemory(ratio=0.3).checked_ratio() == 0.3  # no bytes: the stored ratio
    assert KVMemory(artifact_bytes=300, baseline_bytes=1000).checked_ratio() == pytest.approx(0.3)
    edited = KVMemory(ratio=0.1, artifact_bytes=300, baseline_bytes=1000)
    assert edited.disagrees() and edited.checked_ratio() is None


def test_the_ratio_and_the_allocated_bytes_are_kept_apart() -> None:
    """The ratio's bytes count values at the baseline dtype; the runtime's allocation is in its
    compute dtype and is shown beside the ratio, never in it; a dtype other than bfloat16 is
    named beside every ratio."""
    memory = {**REPORT["kv_memory"], "baseline_dtype": "bfloat16", "allocated_bytes": 4096 + 80,
              "allocated_dtype": "float32"}
    report = report_from_dict({**REPORT, "kv_memory": memory})
    assert report.memory.checked_ratio() == 2048 / 16384  # not the allocated bytes' share
    assert report_to_dict(report)["kv_memory"] == memory  # written back as read
    text = render_markdown(report)
    assert "12.5%** of the source model's cache (2.0 KiB vs 16.0 KiB, values counted in bfloat16)" in text
    assert "allocated by the runtime**" in text and "4.1 KiB in float32 (not a ratio)" in text
    assert "(vs " not in text
    wide = render_markdown(report_from_dict({**REPORT, "kv_memory": {**memory, "baseline_dtype": "float32"}}))
    assert "values counted in float32" in wide
    assert "| KV memory (vs float32) |" in wide  # each table's ratio column
    old = render_markdown(report_from_dict(REPORT))  # a report from before the dtype was stated
    assert "baseline dtype not stated" in old and "allocated by the runtime" not in old


def test_a_report_with_an_unknown_baseline_dtype_is_refused() -> None:
    data = {**REPORT, "kv_memory": {**REPORT["kv_memory"], "baseline_dtype": "int8"}}
    with pytest.raises(ReportError, match=r"kv_memory\.baseline_dtype: expected one of"):
        report_from_dict(data)
