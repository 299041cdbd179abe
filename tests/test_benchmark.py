"""Benchmark stage: task data, lm-eval runs base vs tuned, and the leaderboard's data sets."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, SHARED, default_params, save_lora_adapter
from sabia_ift.config import BenchmarkConfig, parse_section
from sabia_ift.errors import ConfigError, DataError
from sabia_ift.evaluation import benchmark_data
from sabia_ift.evaluation.benchmark import prepare_tasks, run_benchmark
from sabia_ift.toy import benchmark_sets

PT_EVAL = SHARED / "pt-eval"
EXAM = {"name": "exame", "kind": "multiple_choice", "path": str(REPO / "data/sample/benchmark/exame.jsonl"),
        "columns": {"id": "id", "question": "pergunta", "choices": "alternativas", "answer": "resposta"},
        "num_fewshot": 2}

# A classification file sorted by label, 28 "par" rows then 12 "ímpar" ones.
SORTED_PARITY = "".join(json.dumps({"id": f"n{n}", "texto": f"O número sorteado foi {n}.",
                                    "classe": "par" if n < 56 else "ímpar"}, ensure_ascii=False) + "\n"
                        for n in list(range(0, 56, 2)) + list(range(57, 81, 2)))
SORTED_TASK = {"name": "ordenado", "kind": "classification", "labels": ["par", "ímpar"], "num_fewshot": 2,
               "columns": {"id": "id", "text": "texto", "label": "classe"}, "scoring": "loglikelihood"}


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
    return save_lora_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "adapter", random_scale=0.3)


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
        data = benchmark_data.load_task_data(task, i, root=REPO, seed=cfg.seed, limit=cfg.limit)
        assert len(data.fewshot) == task.num_fewshot and len(data.test) == cfg.limit


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
    from stages.benchmark_base import main

    bad = tmp_path / "prova.jsonl"
    bad.write_text('{"pergunta": "Quanto é 2 + 2?", "alternativas": ["3", "4"], "resposta": "C"}\n')
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": default_params()["train"], "benchmark": {
        **default_params()["benchmark"], "tasks": [
            {"name": "prova", "kind": "multiple_choice", "path": str(bad), "num_fewshot": 0,
             "columns": {"question": "pergunta", "choices": "alternativas", "answer": "resposta"}}]}}))
    out = tmp_path / "base.json"
    code = stage.run(main, None, "base", "out", argv=[
        "--params", str(params), "--base", str(tiny_base), "--out", str(out)])
    assert code == 2 and not out.exists()
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


def test_more_fewshot_examples_than_the_data_holds_names_the_task_and_the_key(tmp_path):
    held_out = config({**EXAM, "num_fewshot": benchmark_sets.EXAM_ROWS})
    with pytest.raises(ConfigError) as err:
        benchmark_data.load_task_data(held_out.tasks[0], 0)
    assert str(err.value) == (f"benchmark.tasks.0.num_fewshot: task exame asks for {benchmark_sets.EXAM_ROWS} few-shot "
                              f"examples held out of its {benchmark_sets.EXAM_ROWS} rows, which leaves none to score; "
                              "lower num_fewshot or set fewshot_path")
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(line + "\n" for line in (REPO / EXAM["path"]).read_text().splitlines()[:3]))
    separate = config({**EXAM, "name": "outra", "fewshot_path": str(pool), "num_fewshot": 5})
    with pytest.raises(ConfigError) as err:
        prepare_tasks(separate, tmp_path / "work")
    assert str(err.value) == (f"benchmark.tasks.0.num_fewshot: task outra asks for 5 few-shot examples, but its "
                              f"few-shot pool (fewshot_path {pool}) has 3 rows")


def test_a_scored_sample_of_a_label_sorted_file_holds_both_labels(tmp_path, caplog):
    """The first rows of a label-sorted file are one class; limit draws both, and what is left out is counted."""
    path = tmp_path / "ordenado.jsonl"
    path.write_text(SORTED_PARITY)
    cfg = config({**SORTED_TASK, "path": str(path)}, limit=6)
    with caplog.at_level("WARNING"):
        prepared = prepare_tasks(cfg, tmp_path / "work")
    scored = [json.loads(line) for line in (tmp_path / "work/ordenado/test.jsonl").read_text().splitlines()]
    shots = [json.loads(line) for line in (tmp_path / "work/ordenado/fewshot.jsonl").read_text().splitlines()]
    assert len(scored) == 6 and {r["label"] for r in scored} == {"par", "ímpar"}
    assert not {r["text"] for r in shots} & {r["text"] for r in scored}
    assert prepared["ordenado"]["sample"] == {"majority_baseline": 0.4, "n_available": 38, "n_duplicates_removed": 0,
                                              "n_fewshot_duplicates_removed": 0}
    assert "ordenado" not in caplog.text  # a constant answer scores 0.4 here: no warning
    # All of one class, as limit: 6 made it before: the stage says so.
    path.write_text("".join(line + "\n" for line in SORTED_PARITY.splitlines()[:20]))
    with caplog.at_level("WARNING"):
        prepared = prepare_tasks(cfg, tmp_path / "work")
    assert prepared["ordenado"]["sample"]["majority_baseline"] == 1.0
    assert "benchmark task ordenado: every scored item has the answer 'par'" in caplog.text


def test_repeated_rows_are_scored_once_and_counted(tmp_path):
    path = tmp_path / "repetido.jsonl"
    rows = [json.loads(line) for line in SORTED_PARITY.splitlines()]
    copies = [{**rows[0], "id": "c1", "texto": rows[0]["texto"].upper()},
              {**rows[0], "id": "c2", "texto": "  " + rows[0]["texto"].replace(" ", "\u00a0")},
              {**rows[30], "id": "c3"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + copies))
    cfg = config({**SORTED_TASK, "name": "repetido", "path": str(path), "num_fewshot": 0}, limit=None)
    data = benchmark_data.load_task_data(cfg.tasks[0], 0, limit=None)
    assert data.duplicates_removed == 3 and data.fewshot_duplicates_removed == 0
    assert len(data.test) == data.available == 40
    assert {r["id"] for r in data.test} == {r["id"] for r in rows}


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


# Prompts ------------------------------------------------------------------------

def test_leaderboard_prompts_read_each_field_in_the_leaderboards_words():
    utils = _utils()
    pair = {"premise": "Um homem {corre}", "hypothesis": "Alguém 'corre'\nrápido"}
    assert utils.rte_text(pair) == ("Premissa: Um homem {corre}\nHipótese: Alguém 'corre'\nrápido\n"
                                    "Pergunta: A hipótese pode ser inferida pela premissa? Sim ou Não?\nResposta:")
    assert utils.sts_text(pair) == ("Frase 1: Um homem {corre}\nFrase 2: Alguém 'corre'\nrápido\nPergunta: Quão "
                                    "similares são as duas frases? Dê uma pontuação entre 1,0 a 5,0.\nResposta:")
    assert utils.faquad_text({"question": "Onde?", "answer": "Em Natal."}) == (
        "Pergunta: Onde?\nResposta: Em Natal.\nA resposta dada satisfaz à pergunta? Sim ou Não?")
    assert utils.tweet_text({"text": "bom dia"}) == (
        "Texto: bom dia\nPergunta: O sentimento do texto é Positivo, Neutro ou Negativo?\nResposta:")


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
def run(tiny_base, adapter, tmp_path_factory):
    path = tmp_path_factory.mktemp("sorted") / "ordenado.jsonl"
    path.write_text(SORTED_PARITY)
    cfg = config({**EXAM, "name": "exame_ll", "scoring": "loglikelihood"}, {**EXAM, "name": "exame_gen"},
                 {**SORTED_TASK, "path": str(path)}, limit=6, max_gen_toks=4)
    metrics, raw = run_benchmark(cfg, tiny_base, adapter)
    return cfg, metrics, raw


def test_metrics_shape(run):
    _, metrics, raw = run
    assert list(metrics) == ["exame_ll", "exame_gen", "ordenado"]
    for m in metrics.values():
        assert set(m) >= {"metric", "base", "tuned", "delta", "n", "num_fewshot", "majority_baseline",
                          "n_available", "n_duplicates_removed", "n_fewshot_duplicates_removed",
                          "test", "ci95", "p_value", "significant"}
        assert m["n"] == 6 and m["num_fewshot"] == 2 and m["n_duplicates_removed"] == 0
        assert m["delta"] == pytest.approx(m["tuned"] - m["base"], abs=1e-4)
    assert metrics["exame_ll"]["metric"] == metrics["exame_gen"]["metric"] == "acc"
    assert metrics["exame_ll"]["n_available"] == benchmark_sets.EXAM_ROWS - 2
    # The same seeded sample under both scorings, and a constant answer's accuracy on it.
    docs = {name: [s["doc"] for s in raw["base"]["samples"][name]] for name in ("exame_ll", "exame_gen")}
    assert docs["exame_ll"] == docs["exame_gen"]
    top = max(Counter(d["answer"] for d in docs["exame_ll"]).values())
    assert metrics["exame_ll"]["majority_baseline"] == round(top / 6, 4)
    # The label-sorted file: both labels scored, and what always answering "par" scores reported.
    assert metrics["ordenado"]["metric"] == "f1_macro" and metrics["ordenado"]["majority_baseline"] == 0.4
    assert Counter(s["doc"]["label"] for s in raw["base"]["samples"]["ordenado"]) == {"par": 4, "ímpar": 2}


def test_each_delta_gets_its_paired_test_on_the_items_both_models_answered(run):
    from scipy.stats import binomtest

    _, metrics, raw = run
    for name in ("exame_ll", "exame_gen"):
        base = [s["acc"] for s in sorted(raw["base"]["samples"][name], key=lambda s: s["doc_id"])]
        tuned = [s["acc"] for s in sorted(raw["tuned"]["samples"][name], key=lambda s: s["doc_id"])]
        discordant = [(b, t) for b, t in zip(base, tuned) if b != t]
        won = sum(1 for _, t in discordant if t)
        expected = binomtest(won, len(discordant), 0.5).pvalue if discordant else 1.0
        m = metrics[name]
        assert m["test"] == "mcnemar_exact" and m["p_value"] == pytest.approx(expected, abs=1e-4)
        assert m["significant"] == (m["p_value"] < 0.05) and m["ci95"][0] <= m["delta"] + 1e-4
    assert metrics["ordenado"]["test"] == "paired_bootstrap"
    low, high = metrics["ordenado"]["ci95"]
    assert low <= high and metrics["ordenado"]["significant"] == (low > 0 or high < 0)


def test_base_results_from_their_own_stage_give_the_same_metrics(run, tiny_base, adapter, tmp_path):
    """benchmark_base scores the base alone (no adapter loaded); the tuned stage reads it back."""
    from sabia_ift.artifacts import TrainMeta
    from sabia_ift.evaluation.benchmark import benchmark_base

    cfg, metrics, _ = run
    meta = TrainMeta.read(adapter)
    loading = {"quantization": meta.quantization, "double_quant": meta.double_quant, "precision": meta.precision}
    benchmark_base(cfg, loading, tiny_base, tmp_path / "base.json")
    split, raw = run_benchmark(cfg, tiny_base, adapter, base_results=tmp_path / "base.json")
    assert split == metrics and set(raw) == {"tuned"}
    # Base results for other rows (a changed seed draws other examples) are refused, not paired.
    stale = parse_section("benchmark", {**cfg.model_dump(), "seed": cfg.seed + 1})
    with pytest.raises(DataError, match="rerun the benchmark_base stage"):
        run_benchmark(stale, tiny_base, adapter, base_results=tmp_path / "base.json")
    # Base results from a base loaded otherwise (train.quantization changed since) are refused too.
    record = json.loads((tmp_path / "base.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**record, "loading": {**loading, "quantization": "nf4"}}))
    with pytest.raises(DataError, match="train.quantization"):
        run_benchmark(cfg, tiny_base, adapter, base_results=tmp_path / "other.json")


def test_the_stage_scores_what_lm_eval_scores_on_its_own(run, tiny_base, adapter, tmp_path):
    """Same YAML and rows, lm-eval loading the model itself (pretrained=<folder>, peft=<adapter>) and
    scoring it with its own HFLM (the stage's keeps only the continuation's logits) through
    `simple_evaluate` (the stage calls the evaluator beneath it)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    cfg, metrics, _ = run
    prepare_tasks(cfg, tmp_path)
    names = [t.name for t in cfg.tasks]
    for side, model_args in (("base", {}), ("tuned", {"peft": str(adapter)})):
        lm = HFLM(pretrained=str(tiny_base), device="cpu", batch_size=4, dtype="float32", **model_args)
        direct = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            bootstrap_iters=0, random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed)
        for name in names:
            score = direct["results"][name][f"{metrics[name]['metric']},none"]
            assert score == pytest.approx(metrics[name][side], abs=1e-4), (side, name)


def test_the_fast_engine_scores_as_the_loaded_model(run, tiny_base, adapter, monkeypatch):
    """benchmark.engine fast: log-likelihoods and greedy answers from a plain copy (the adapter merged
    for the tuned side) give the scores of the loaded model with lm-eval's batches."""
    from sabia_ift.evaluation import generation

    cfg, metrics, _ = run
    copies = []
    real = generation.inference_copy
    monkeypatch.setattr(generation, "inference_copy", lambda model, merge: copies.append(merge) or real(model, merge))
    fast, raw = run_benchmark(parse_section("benchmark", {**cfg.model_dump(), "engine": "fast"}), tiny_base, adapter)
    assert copies == [False, True]
    for name, m in metrics.items():
        for side in ("base", "tuned"):
            assert fast[name][side] == pytest.approx(m[side], abs=1e-4), (name, side)
    assert raw["tuned"]["samples"]["exame_gen"][0]["resps"]  # generated answers came back through lm-eval


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
    # Its test file repeats 12 pairs word for word: each is scored once.
    assert len(data["assin2_rte"].test) == 2448 - 12 and data["assin2_rte"].duplicates_removed == 12
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
def test_pt_eval_samples_keep_the_files_label_shares_and_apart_from_the_examples():
    from sabia_ift.evaluation import sampling

    cfg = config(*PT_TASKS)
    for i, task in enumerate(cfg.tasks):
        if task.kind not in ("faquad_nli", "tweetsentbr", "assin2_rte"):
            continue
        every = benchmark_data.load_task_data(task, i, seed=cfg.seed)
        drawn = benchmark_data.load_task_data(task, i, seed=cfg.seed, limit=40)
        assert drawn.fewshot == every.fewshot and drawn.available == len(every.test)
        shares = Counter(r["label"] for r in every.test)
        assert Counter(r["label"] for r in drawn.test) == sampling.proportional_quotas(shares, 40), task.name
        shown = {sampling.prompt_key(r, task.kind) for r in drawn.fewshot}
        assert not shown & {sampling.prompt_key(r, task.kind) for r in every.test}, task.name


@needs_pt_eval
def test_pt_eval_tasks_run_through_lm_eval_in_the_leaderboards_format(tiny_base, adapter):
    cfg = config(*PT_TASKS, limit=2, max_gen_toks=4)
    metrics, raw = run_benchmark(cfg, tiny_base, adapter)
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
    new = {"enem": {"metric": "acc", "base": 0.5, "tuned": 0.45, "delta": -0.05, "n": 10, "num_fewshot": 3,
                    "majority_baseline": 0.3},
           "sts": {"metric": "pearson", "base": None, "tuned": 0.3, "delta": None, "n": 10, "num_fewshot": 15,
                   "majority_baseline": None},
           "rte": {"metric": "f1_macro", "base": 0.4, "tuned": 0.6, "delta": 0.2, "n": 10, "num_fewshot": 15}}
    rows = benchmark_rows(old, new)
    assert all(len(r) == len(BENCHMARK_HEADERS) for r in rows)
    assert BENCHMARK_HEADERS[6] == "constant answer" and BENCHMARK_HEADERS[10] == "overlap"
    # A file written before the paired tests: bare deltas, marked as untested.
    assert rows[0] == ["enem", "acc", "0.5000", "0.4500", "-0.0500", "—", "0.3000", "0.5500", "10", "3", "—",
                       "❌ tuned below base (not tested); ❌ tuned below the previous run (not tested)"]
    # Pearson has no constant answer; a file written before the baseline existed shows none either.
    assert rows[1][2] == rows[1][6] == rows[2][6] == "—" and rows[1][-1] == ""
    assert rows[2][-1] == "✅ tuned above base (not tested)"
    assert rows[3] == ["gone", "acc", "—", "—", "—", "—", "—", "0.2000", "—", "—", "—", "removed"]
    assert benchmark_rows(None, new)[0][7] == "—"


def test_benchmark_rows_show_each_tested_delta_and_the_training_overlap():
    from sabia_ift.evaluation.benchmark_report import BENCHMARK_HEADERS, benchmark_rows

    tested = {"metric": "acc", "base": 0.5, "tuned": 0.6, "delta": 0.1, "n": 120, "num_fewshot": 3,
              "test": "mcnemar_exact", "ci95": [0.0333, 0.1667], "p_value": 0.00012, "significant": True}
    new = {"enem": tested,
           "rte": {**tested, "metric": "f1_macro", "test": "paired_bootstrap", "delta": 0.02,
                   "ci95": [-0.03, 0.07], "p_value": 0.41, "significant": False},
           "sts": {**tested, "metric": "pearson", "delta": -0.2, "ci95": [-0.3, -0.1], "p_value": 0.00001},
           "new_task": {**tested, "test": None, "ci95": None, "p_value": None, "significant": None}}
    # metrics/contamination.json as the contamination stage writes it, by hand.
    contamination = {"n": 13, "policy": "report", "rows_checked": 1000,
                     "targets": {"test": {"items": 100, "rows_flagged": 1, "share": 0.001},
                                 "enem": {"items": 120, "rows_flagged": 3, "share": 0.003},
                                 "rte": {"items": 120, "rows_flagged": 0, "share": 0.0}},
                     "longest": []}
    rows = {r[0]: dict(zip(BENCHMARK_HEADERS, r)) for r in benchmark_rows(None, new, contamination)}
    assert rows["enem"]["tuned − base [95% interval]"] == "+0.1000 [+0.0333, +0.1667]"
    assert rows["enem"]["p"] == "0.0001" and rows["sts"]["p"] == "<0.0001"
    assert rows["enem"]["verdict"] == "✅ better than base" and rows["sts"]["verdict"] == "❌ worse than base"
    assert rows["rte"]["verdict"] == "no significant change from base" and rows["rte"]["p"] == "0.4100"
    assert rows["new_task"]["tuned − base [95% interval]"] == "+0.1000" and rows["new_task"]["p"] == "—"
    assert rows["enem"]["overlap"] == "⚠️ 3 rows" and rows["rte"]["overlap"] == "0"
    assert rows["sts"]["overlap"] == "—"  # the check listed no such task
    assert all(r[10] == "—" for r in benchmark_rows(None, new))  # no contamination file
