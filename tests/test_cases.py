"""``kvcompile eval --cases``: a team's own cases, same report format, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvcompile.eval.cases import ANSWERS_TASK, CasesError, read_cases, tokenize_cases
from kvcompile.eval.evaluate import EvalConfig, evaluate_systems
from kvcompile.eval.report import AccuracyRow, ContinuationRow, report_to_dict
from kvcompile.plan import BudgetLayout, LayerPlan, Plan
from kvcompile.runtime.engine import Engine
from tests.tiny import compact_logits, save_tokenizer, tiny_loaded


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.mark.parametrize(("lines", "expected"), [
    (['{"context": "a", "question": "b", "answers": ["c"]}', "{nope"], "line 2: not valid JSON"),
    ([{"context": "a", "question": "b"}], "line 1: missing field 'answers'"),
    ([{"question": "b", "answers": ["c"]}], "line 1: missing field 'context'"),
    ([{"context": "a", "question": "b", "answers": []}], "line 1: field 'answers' must be a non-empty list"),
    ([{"context": "a", "question": "b", "answers": "c"}], "line 1: field 'answers' must be a non-empty list"),
    ([{"context": "a", "continuation": 3}], "line 1: field 'continuation' must be a non-empty string"),
    ([{"context": "a", "continuation": "x", "question": "q", "answers": ["c"]}], "line 1: give either"),
    ([{"context": "a", "answer": "c"}], "line 1: unknown field 'answer'"),
    (["", "[1, 2]"], "line 2: expected a JSON object"),
    ([""], "has no cases"),
])
def test_bad_cases_files_name_the_line_and_field(tmp_path: Path, lines: list, expected: str) -> None:
    path = _write(tmp_path / "cases.jsonl", lines)
    with pytest.raises(CasesError) as caught:
        read_cases(path)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(CasesError, match="does not exist"):
        read_cases(tmp_path / "none.jsonl")
    with pytest.raises(CasesError, match=r"\.jsonl"):
        read_cases(_write(tmp_path / "cases.json", [{"context": "a", "continuation": "b"}]))


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(directory)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    loaded = tiny_loaded("llama", seed=5)
    model = loaded.build()
    return Engine(model, Plan.uncompressed(loaded.arch.n_layers, loaded.arch.n_kv_heads), tokenizer,
                  max_context=256, eos_token_ids=(2,))


def _words(rng: torch.Generator, n: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(3, 96, (n,), generator=rng))


def test_cases_report_against_an_independent_greedy_and_nll(tiny_engine: Engine, tmp_path: Path) -> None:
    """Baseline accuracy and NLL equal a plain recomputation with the uncompressed model."""
    engine = tiny_engine
    rng = torch.Generator().manual_seed(1)
    contexts = [_words(rng, 40) for _ in range(3)]
    question = " w7 w8 w9"
    tok = engine.tokenizer

    def greedy_words(context: str) -> str:  # the uncompressed model's answer, without the runtime
        ids = tok.encode(context, add_special_tokens=False) + tok.encode(question, add_special_tokens=False)
        out = []
        for _ in range(8):
            token = int(compact_logits(engine.model, torch.tensor([ids]))[0, -1].argmax())
            if token == 2:
                break
            out.append(token)
            ids.append(token)
        return tok.decode(out, skip_special_tokens=True)

    right = [greedy_words(c) for c in contexts[:2]]
    assert all(right)
    continuation = _words(rng, 12)
    path = _write(tmp_path / "cases.jsonl", [
        {"context": contexts[0], "question": question, "answers": ["w3 w3 w3 w3", right[0]]},  # second accepted
        {"context": contexts[1], "question": question, "answers": [right[1]]},
        {"context": contexts[2], "question": question, "answers": ["w4 w4 w4 w4 w4 w4 w4 w4"]},  # wrong
        {"context": contexts[2], "continuation": continuation},
    ])
    cases = tokenize_cases(tok, read_cases(path), path, engine.max_context, 32)
    arch = engine.arch
    budgeted = Plan(tuple(LayerPlan((0,), tuple(range(1, arch.n_kv_heads)), BudgetLayout(2, 1, 2, 6))
                          for _ in range(arch.n_layers)))
    reports = evaluate_systems(engine, {"plan": budgeted.to_served(permuted_by=None)},
                               EvalConfig(agreement_tokens=4), cases=cases)
    report = reports["plan"]
    rows = {row.task: row for row in report.rows}
    assert set(rows) == {ANSWERS_TASK, "continuation"}
    answers, cont_row = rows[ANSWERS_TASK], rows["continuation"]
    assert isinstance(answers, AccuracyRow) and isinstance(cont_row, ContinuationRow)
    assert answers.n == 3 and answers.baseline.correct == 2
    assert answers.length == max(len(c.context_ids) for c in cases)
    ctx = tok.encode(contexts[2], add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    logp = torch.log_softmax(compact_logits(engine.model, torch.tensor([ctx + cont]))[0].float(), -1)
    nll = -logp[torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), torch.tensor(cont)].mean()
    assert cont_row.baseline.nll == pytest.approx(float(nll), rel=1e-4)
    assert report.settings is not None and report.settings.cases == 4 and report.settings.genre is None
    assert "genre" not in report_to_dict(report)["settings"]


def test_case_longer_than_the_context_is_refused(tiny_engine: Engine, tmp_path: Path) -> None:
    path = _write(tmp_path / "cases.jsonl", [{"context": "a", "continuation": "b c"},
                                            {"context": " ".join(["w5"] * 300), "continuation": "w6 w7"}])
    with pytest.raises(CasesError, match="line 2: .* more than the context of 256"):
        tokenize_cases(tiny_engine.tokenizer, read_cases(path), path, 256, 32)
