"""Benchmark stage: task data, lm-eval runs base vs tuned, and the leaderboard's data sets."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED, default_params
from sabia_ift.config import BenchmarkConfig, parse_section
from sabia_ift.errors import ConfigError, DataError
from sabia_ift.evaluation import benchmark_data
from sabia_ift.evaluation.benchmark import evaluate_tasks, prepare_tasks, run_benchmark
from sabia_ift.toy import benchmark_sets

PT_EVAL = SHARED / "pt-eval"
EXAM = {"name": "exame", "kind": "multiple_choice", "path": str(REPO / "data/sample/benchmark/exame.jsonl"),
        "columns": {"id": "id", "question": "pergunta", "choices": "alternativas", "answer": "resposta"},
        "num_fewshot": 2}


def _utils():
    """The tasks' utils.py, loaded by path as lm-eval loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("task_utils", REPO / "sabia_ift/evaluation/tasks/utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(*tasks, **kwargs) -> BenchmarkConfig:
    return parse_section("benchmark", {**default_params()["benchmark"], "tasks": list(tasks), "batch_size": 4,
                                       "device": "cpu", **kwargs})


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    """A LoRA adapter with random, clearly non-zero weights: tuned must differ from base."""
    from peft import LoraConfig, get_peft_model

    from sabia_ift.artifacts import TrainMeta
    from sabia_ift.modeling import load_model

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft.save_pretrained(out)
    TrainMeta(quantization="none", double_quant=False, precision="fp32", base={}).write(out)
    return out


# The embedded default's sets ---------------------------------------------------

def test_bundled_sets_are_the_generators_output_and_correct(tmp_path):
    benchmark_sets.write(tmp_path)
    for name in (benchmark_sets.EXAM_FILE, benchmark_sets.PARITY_FILE):
        assert (tmp_path / name).read_bytes() == (REPO / "data/sample/benchmark" / name).read_bytes(), name
    assert all(map(benchmark_sets.check_exam_row, benchmark_sets.exam_rows()))
    assert all(map(benchmark_sets.check_parity_row, benchmark_sets.parity_rows()))
    wrong = {**benchmark_sets.exam_rows()[0], "resposta": "B"}
    assert not benchmark_sets.check_exam_row(wrong)


def test_default_params_name_tasks_that_load():
    from sabia_ift.config import load_section

    cfg = load_section("benchmark", REPO / "params.yaml")
    assert cfg.tasks
    for i, task in enumerate(cfg.tasks):
        data = benchmark_data.load_task_data(task, i, root=REPO)
        assert len(data.fewshot) == task.num_fewshot and len(data.test) >= cfg.limit


# Generic tasks from params ---------------------------------------------------------

def test_choice_columns_and_list_column_give_the_same_rows(tmp_path):
    rows = [{"q": "Quanto é 2 + 2?", "A": "3", "B": "4", "C": "5", "ans": "b"},
            {"q": "Qual é a capital do Ceará?", "A": "Natal", "B": "Recife", "C": "Fortaleza", "ans": "C"}]
    (tmp_path / "cols.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    listed = [{"q": r["q"], "opts": [r["A"], r["B"], r["C"]], "ans": r["ans"]} for r in rows]
    (tmp_path / "list.json").write_text(json.dumps(listed))
    common = {"kind": "multiple_choice", "num_fewshot": 0}
    by_cols = config({**common, "name": "a", "path": str(tmp_path / "cols.jsonl"),
                      "columns": {"question": "q", "choice_columns": ["A", "B", "C"], "answer": "ans"}})
    by_list = config({**common, "name": "b", "path": str(tmp_path / "list.json"),
                      "columns": {"question": "q", "choices": "opts", "answer": "ans"}})
    a = benchmark_data.load_task_data(by_cols.tasks[0], 0).test
    b = benchmark_data.load_task_data(by_list.tasks[0], 0).test
    assert a == b
    assert a[0] == {"id": "1", "question": "Quanto é 2 + 2?", "choices": ["3", "4", "5"], "answer": "B"}


BAD_MC = [
    ({"q": "Quanto é 1 + 1?", "A": "2", "B": "", "C": "4", "ans": "A"}, "row 2: key B: missing or empty"),
    ({"q": "Quanto é 1 + 1?", "A": "2", "B": "3", "C": "4", "ans": "E"},
     "row 2: key ans: answer 'E' is not among the choices A, B, C"),
    ({"q": " ", "A": "2", "B": "3", "C": "4", "ans": "A"}, "row 2: key q: missing or empty"),
]


@pytest.mark.parametrize("bad,message", BAD_MC, ids=["missing choice", "answer not a choice", "no question"])
def test_bad_exam_row_is_a_data_error_naming_file_row_and_key(tmp_path, bad, message):
    good = {"q": "Quanto é 2 + 2?", "A": "3", "B": "4", "C": "5", "ans": "B"}
    path = tmp_path / "exam.csv"
    header = list(good)
    path.write_text("\n".join([",".join(header)] + [",".join(r[k] for k in header) for r in (good, bad)]))
    cfg = config({"name": "prova", "kind": "multiple_choice", "path": str(path), "num_fewshot": 0,
                  "columns": {"question": "q", "choice_columns": ["A", "B", "C"], "answer": "ans"}})
    with pytest.raises(DataError) as err:
        prepare_tasks(cfg, tmp_path / "work")
    assert str(err.value) == f"{path}: {message}"


def test_unknown_label_and_short_choice_list(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"t": "ótimo", "y": "bom"}\n{"t": "péssimo", "y": "horrível"}\n')
    cfg = config({"name": "c", "kind": "classification", "path": str(path), "labels": ["bom", "ruim"],
                  "columns": {"text": "t", "label": "y"}, "num_fewshot": 0})
    with pytest.raises(DataError,
                       match=r"set.jsonl: row 2: key y: unknown label 'horrível'; the task's labels are bom, ruim"):
        benchmark_data.load_task_data(cfg.tasks[0], 0)
    path.write_text('{"q": "?", "c": ["só uma"], "a": "A"}\n')
    cfg = config({"name": "m", "kind": "multiple_choice", "path": str(path), "num_fewshot": 0,
                  "columns": {"question": "q", "choices": "c", "answer": "a"}})
    with pytest.raises(DataError, match=r"row 1: key c: expected a list of 2 to 10 choices"):
        benchmark_data.load_task_data(cfg.tasks[0], 0)


def test_the_stage_reports_a_bad_row_in_one_line_and_writes_nothing(tmp_path, capsys, tiny_base):
    import yaml

    from sabia_ift import stage
    from stages.benchmark import main

    bad = tmp_path / "prova.jsonl"
    bad.write_text('{"pergunta": "Quanto é 2 + 2?", "alternativas": ["3", "4"], "resposta": "C"}\n')
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"benchmark": {**default_params()["benchmark"], "tasks": [
        {"name": "prova", "kind": "multiple_choice", "path": str(bad), "num_fewshot": 0,
         "columns": {"question": "pergunta", "choices": "alternativas", "answer": "resposta"}}]}}))
    metrics = tmp_path / "benchmarks.json"
    code = stage.run(main, None, "base", "adapter", "metrics", argv=[
        "--params", str(params), "--base", str(tiny_base), "--adapter", str(tmp_path / "none"),
        "--metrics", str(metrics)])
    assert code == 2 and not metrics.exists()
    assert capsys.readouterr().err == (f"error: {bad}: row 1: key resposta: answer 'C' is not among the "
                                       "choices A, B\n")


@pytest.mark.parametrize("task,message", [
    ({"name": "c", "kind": "classification", "path": "x.csv", "labels": ["só"]}, "at least two distinct labels"),
    ({"name": "m", "kind": "multiple_choice"}, "set path"),
    ({"name": "e", "kind": "enem"}, "set dataset"),
    ({"name": "e", "kind": "enem", "path": "x.json", "scoring": "loglikelihood"}, "scoring must be generate"),
    ({"name": "Bad-Name", "kind": "enem", "path": "x.json"}, "benchmark.tasks.0.name"),
])
def test_bad_task_configs_are_refused_by_key(task, message):
    with pytest.raises(ConfigError, match=message):
        config(task)


def test_task_names_must_be_unique():
    with pytest.raises(ConfigError, match="unique: exame"):
        config(EXAM, EXAM)


def test_fewshot_examples_are_held_out_of_the_test_rows():
    data = benchmark_data.load_task_data(config(EXAM).tasks[0], 0)
    shots = {row["id"] for row in data.fewshot}
    assert len(shots) == 2 and not shots & {row["id"] for row in data.test}
    assert len(data.test) + len(shots) == benchmark_sets.EXAM_ROWS


def test_a_hub_task_reads_the_leaderboards_copy_at_its_revision(monkeypatch, caplog):
    import datasets

    rows = [{"id": f"2022_{i}", "exam_id": "2022", "question": f"Pergunta {i}?",
             "choices": {"text": ["um", "dois", "três", "quatro", "cinco"], "label": list("ABCDE")},
             "answerKey": "ABCDE"[i % 5]} for i in (1, 21, 88, 143, 150)]
    asked = []

    def load_dataset(name, revision, split):
        asked.append((name, revision, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = config({"name": "enem", "kind": "enem", "dataset": "org/enem", "revision": "main"})
    data = benchmark_data.load_task_data(cfg.tasks[0], 0)
    assert asked == [("org/enem", "main", "train")]
    assert "not a commit sha" in caplog.text
    assert [r["id"] for r in data.fewshot] == ["2022_21", "2022_88", "2022_143"]
    assert [r["id"] for r in data.test] == ["2022_1", "2022_150"] and data.test[0]["answer"] == "B"
    assert data.source == {"dataset": "org/enem", "revision": "main"}


# Reading answers ----------------------------------------------------------------

def test_answer_readers():
    utils = _utils()
    assert utils.find_letter(" C", "ABCDE") == "C"
    assert utils.find_letter("A resposta correta é a letra D.", "ABCDE") == "D"
    assert utils.find_letter("Alternativa: B", "ABCDE") == "B"
    # The article "a" and the conjunction "e" are not answers.
    assert utils.find_letter("e a casa", "ABCDE") is None
    assert utils.find_letter(" F", "ABCDE") is None
    assert utils.find_label(" nao, pois", ["Sim", "Não"]) == "Não"
    assert utils.find_label(" Negativo ou Positivo", ["Positivo", "Neutro", "Negativo"]) == "Negativo"
    assert utils.find_label(" Simone", ["Sim", "Não"]) is None
    assert utils.find_score(" 3,5 pontos") == 3.5 and utils.find_score(" 9") == 5.0
    assert utils.find_score(" nenhum") == 5.0
    assert utils.f1_macro([("a", "a"), ("b", None), ("b", "b")]) == pytest.approx((1 + 2 / 3) / 2)
    import numpy as np

    pairs = [(1, 2), (2, 4), (3, 6.5), (4.5, 5)]
    assert utils.pearson(pairs) == pytest.approx(np.corrcoef(*zip(*pairs))[0, 1])
    assert math.isnan(utils.pearson([(1, 5.0), (2, 5.0)]))


# Base vs tuned through lm-eval ----------------------------------------------------------

@pytest.fixture(scope="module")
def run(tiny_base, adapter):
    cfg = config({**EXAM, "name": "exame_ll", "scoring": "loglikelihood"}, {**EXAM, "name": "exame_gen"},
                 limit=6, max_gen_toks=4)
    metrics, raw = run_benchmark(cfg, tiny_base, adapter, log_samples=True)
    return cfg, metrics, raw


def test_metrics_shape(run):
    _, metrics, _ = run
    assert list(metrics) == ["exame_ll", "exame_gen"]
    for m in metrics.values():
        assert set(m) == {"metric", "base", "tuned", "delta", "n", "num_fewshot"}
        assert m["metric"] == "acc" and m["n"] == 6 and m["num_fewshot"] == 2
        assert m["delta"] == pytest.approx(m["tuned"] - m["base"], abs=1e-4)


def test_the_stage_scores_what_lm_eval_scores_on_its_own(run, tiny_base, adapter, tmp_path):
    """Same YAML, lm-eval loading the model itself (pretrained=<folder>, peft=<adapter>)."""
    from lm_eval.models.huggingface import HFLM

    cfg, metrics, _ = run
    prepare_tasks(cfg, tmp_path)
    names = [t.name for t in cfg.tasks]
    for side, model_args in (("base", {}), ("tuned", {"peft": str(adapter)})):
        lm = HFLM(pretrained=str(tiny_base), device="cpu", batch_size=4, dtype="float32", **model_args)
        direct = evaluate_tasks(lm, names, tmp_path, limit=cfg.limit, seed=cfg.seed)
        for name in names:
            assert direct["results"][name]["acc,none"] == pytest.approx(metrics[name][side], abs=1e-4), (side, name)


def test_the_adapter_is_applied_and_both_see_the_same_prompts(run):
    _, _, raw = run
    for name in ("exame_ll", "exame_gen"):
        base, tuned = raw["base"]["samples"][name], raw["tuned"]["samples"][name]
        assert [s["arguments"] for s in base] == [s["arguments"] for s in tuned]
        assert [s["doc"] for s in base] == [s["doc"] for s in tuned]
    base_ll = [r[0][0] for s in raw["base"]["samples"]["exame_ll"] for r in s["resps"]]
    tuned_ll = [r[0][0] for s in raw["tuned"]["samples"]["exame_ll"] for r in s["resps"]]
    # One loglikelihood per choice (5) per question (6); the adapter moves every one of them.
    assert len(base_ll) == 6 * 5 and all(abs(b - t) > 1e-3 for b, t in zip(base_ll, tuned_ll))


# The leaderboard's data sets (../shared/pt-eval) -------------------------------------------

needs_pt_eval = pytest.mark.skipif(not PT_EVAL.is_dir(), reason="../shared/pt-eval is not here")

PT_TASKS = [
    {"name": "enem", "kind": "enem", "path": str(PT_EVAL / "enem2022.json")},
    {"name": "assin2_rte", "kind": "assin2_rte", "path": str(PT_EVAL / "assin2-test.xml"),
     "fewshot_path": str(PT_EVAL / "assin2-train-only.xml")},
    {"name": "assin2_sts", "kind": "assin2_sts", "path": str(PT_EVAL / "assin2-test.xml"),
     "fewshot_path": str(PT_EVAL / "assin2-train-only.xml")},
    {"name": "faquad_nli", "kind": "faquad_nli", "path": str(PT_EVAL / "faquad_dev.json"),
     "fewshot_path": str(PT_EVAL / "faquad_train.json")},
    {"name": "tweetsentbr", "kind": "tweetsentbr", "path": str(PT_EVAL / "tweetsentbr_poeta750.json")},
]


@needs_pt_eval
def test_pt_eval_files_convert_to_the_builtin_tasks():
    cfg = config(*PT_TASKS)
    data = {t.name: benchmark_data.load_task_data(t, i) for i, t in enumerate(cfg.tasks)}
    # ENEM 2022: 179 questions, 56 need an image; the leaderboard's 3 examples are held out.
    assert [r["id"] for r in data["enem"].fewshot] == ["ENEM_2022_21", "ENEM_2022_88", "ENEM_2022_143"]
    assert len(data["enem"].test) == 179 - 56 - 3
    assert {r["answer"] for r in data["enem"].test} == set("ABCDE")
    # ASSIN 2: the leaderboard's first 15 few-shot pair ids, from the train file, in its order.
    assert [r["id"] for r in data["assin2_rte"].fewshot] == list(benchmark_data.ASSIN2_FEWSHOT_IDS[:15])
    assert len(data["assin2_rte"].test) == 2448
    assert {r["label"] for r in data["assin2_rte"].fewshot} == {"Sim", "Não"}
    assert all(1.0 <= r["score"] <= 5.0 for r in data["assin2_sts"].test)
    # FaQuAD-NLI: each of the 63 dev questions paired with each sentence of its paragraph.
    faquad = data["faquad_nli"]
    assert len({r["question"] for r in faquad.test}) == 63 and len(faquad.fewshot) == 15
    assert {r["label"] for r in faquad.test} == {"Sim", "Não"}
    assert {r["label"] for r in faquad.fewshot} == {"Sim", "Não"}
    # Every question has at least one answering sentence, and most paragraphs several sentences.
    assert {r["question"] for r in faquad.test if r["label"] == "Sim"} == {r["question"] for r in faquad.test}
    assert len(faquad.test) > 3 * 63
    # TweetSentBR: the file's own test rows; 25 few-shot rows from its train rows.
    assert len(data["tweetsentbr"].test) == 80 and len(data["tweetsentbr"].fewshot) == 25


@needs_pt_eval
def test_pt_eval_tasks_run_through_lm_eval_in_the_leaderboards_format(tiny_base, adapter):
    cfg = config(*PT_TASKS, limit=2, max_gen_toks=4)
    metrics, raw = run_benchmark(cfg, tiny_base, adapter, log_samples=True)
    shots = {"enem": 3, "assin2_rte": 15, "assin2_sts": 15, "faquad_nli": 15, "tweetsentbr": 25}
    for name, m in metrics.items():
        assert m["n"] == 2 and m["num_fewshot"] == shots[name]
        assert m["metric"] == ("acc" if name == "enem" else "pearson" if name == "assin2_sts" else "f1_macro")
    def prompt(name):
        return raw["base"]["samples"][name][0]["arguments"][0][0]
    assert prompt("enem").startswith("As perguntas a seguir são questões de múltipla escolha do Exame Nacional")
    assert prompt("enem").count("\nAlternativas:\nA. ") == 4 and prompt("enem").endswith("Resposta correta:")
    assert prompt("assin2_rte").count("Sim ou Não?\nResposta:") == 16
    assert prompt("assin2_sts").count("Dê uma pontuação entre 1,0 a 5,0.\nResposta:") == 16
    assert prompt("faquad_nli").endswith("A resposta dada satisfaz à pergunta? Sim ou Não?")
    assert prompt("tweetsentbr").count("\nPergunta: O sentimento do texto é Positivo, Neutro ou Negativo?") == 26
    # STS few-shot answers are written the Brazilian way.
    assert len(re.findall(r"\nResposta: [1-5],\d\n\n", prompt("assin2_sts"))) == 15


# The report's table ------------------------------------------------------------------

def test_benchmark_rows_mark_regressions():
    from sabia_ift.evaluation.benchmark_report import BENCHMARK_HEADERS, benchmark_rows

    old = {"enem": {"metric": "acc", "base": 0.5, "tuned": 0.55, "delta": 0.05, "n": 10, "num_fewshot": 3},
           "gone": {"metric": "acc", "base": 0.1, "tuned": 0.2, "delta": 0.1, "n": 10, "num_fewshot": 3}}
    new = {"enem": {"metric": "acc", "base": 0.5, "tuned": 0.45, "delta": -0.05, "n": 10, "num_fewshot": 3},
           "sts": {"metric": "pearson", "base": None, "tuned": 0.3, "delta": None, "n": 10, "num_fewshot": 15},
           "rte": {"metric": "f1_macro", "base": 0.4, "tuned": 0.6, "delta": 0.2, "n": 10, "num_fewshot": 15}}
    rows = benchmark_rows(old, new)
    assert all(len(r) == len(BENCHMARK_HEADERS) for r in rows)
    assert rows[0] == ["enem", "acc", "0.5000", "0.4500", "-0.0500", "0.5500", "10", "3",
                       "❌ tuned below base; ❌ tuned below the previous run"]
    assert rows[1][2] == "—" and rows[1][-1] == ""
    assert rows[2][-1] == "✅ tuned above base"
    assert rows[3] == ["gone", "acc", "—", "—", "—", "0.2000", "—", "—", "removed"]
    assert benchmark_rows(None, new)[0][5] == "—"
