"""Prompts and scoring for the project's lm-evaluation-harness tasks.

lm-eval loads this file by path from the task YAML files beside it (`!function
utils.name`), so it imports nothing from sabia_ift. Every task reads the
project's own row shapes, which sabia_ift/evaluation/benchmark_data.py writes:

    multiple choice   {"id", "question", "choices": [...], "answer": "C"}
    classification    {"id", "text", "label": "<label name>", "labels": [...]}
    sentence pair     {"id", "premise", "hypothesis", "label": "Sim" | "Não"}
    question/answer   {"id", "question", "answer", "label": "Sim" | "Não"}
    similarity        {"id", "premise", "hypothesis", "score": 1.0 .. 5.0}

Answers are read from generated text the way the Open Portuguese LLM
Leaderboard reads them (first letter or label found, accents and case
ignored), or, for `loglikelihood` scoring, picked as the most likely choice.
"""

import math
import re
import unicodedata

LETTERS = "ABCDEFGHIJ"


def _plain(text):
    """Lower case, no accents, single spaces: 'Não ' and 'nao' compare equal."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(text.lower().split())


# Prompts ---------------------------------------------------------------------

def mc_text(doc):
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(doc["choices"]))
    return f"Pergunta:\n{doc['question']}\nAlternativas:\n{options}\nResposta correta:"


# The leaderboard's sentence-pair and tweet prompts. Python, not Jinja templates in the YAML
# files: lm-eval compiles a template again for every rendering, and with 15 to 25 few-shot
# examples a prompt that was seconds of a benchmark stage's host time.
def rte_text(doc):
    return (f"Premissa: {doc['premise']}\nHipótese: {doc['hypothesis']}\n"
            "Pergunta: A hipótese pode ser inferida pela premissa? Sim ou Não?\nResposta:")


def sts_text(doc):
    return (f"Frase 1: {doc['premise']}\nFrase 2: {doc['hypothesis']}\n"
            "Pergunta: Quão similares são as duas frases? Dê uma pontuação entre 1,0 a 5,0.\nResposta:")


def faquad_text(doc):
    return (f"Pergunta: {doc['question']}\nResposta: {doc['answer']}\n"
            "A resposta dada satisfaz à pergunta? Sim ou Não?")


def tweet_text(doc):
    return f"Texto: {doc['text']}\nPergunta: O sentimento do texto é Positivo, Neutro ou Negativo?\nResposta:"


def mc_letters(doc):
    return list(LETTERS[: len(doc["choices"])])


def mc_gold_index(doc):
    return LETTERS.index(doc["answer"])


def class_text(doc):
    labels = doc["labels"]
    options = ", ".join(labels[:-1]) + f" ou {labels[-1]}" if len(labels) > 1 else labels[0]
    return f"Texto: {doc['text']}\nPergunta: O texto é {options}?\nResposta:"


def class_labels(doc):
    return list(doc["labels"])


def class_gold_index(doc):
    return doc["labels"].index(doc["label"])


def sts_target(doc):
    # The leaderboard writes scores the Brazilian way: one decimal, comma.
    return f"{doc['score']:.1f}".replace(".", ",")


# Reading generated answers ---------------------------------------------------

# Letters are matched in capitals only: a lower-case "a" or "e" is an article or "and".
_LETTER_PATTERNS = (
    r"(?i:letra|alternativa|resposta(?: correta)?(?: e)?|opcao):? ([A-J])\b",
    r"\b([A-J])\s?[.):-]",
    r"\b([A-J])$",
    r"\b([A-J])\b",
)


def find_letter(text, letters):
    """The first answer letter in a generation, or None."""
    plain = " ".join(unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().split())
    for pattern in _LETTER_PATTERNS:
        for match in re.finditer(pattern, plain):
            if match.group(1) in letters:
                return match.group(1)
    return None


def find_label(text, labels):
    """The label that appears first in a generation (accents and case ignored), or None."""
    plain = _plain(text)
    best, where = None, len(plain) + 1
    for label in labels:
        match = re.search(r"(?<!\w)" + re.escape(_plain(label)) + r"(?!\w)", plain)
        if match and match.start() < where:
            best, where = label, match.start()
    return best


def find_score(text, low=1.0, high=5.0, fallback=5.0):
    """The first number in a generation, clipped to [low, high]; `fallback` when there is none."""
    match = re.search(r"-?\d+(?:[.,]\d+)?", text)
    if not match:
        return fallback
    return min(high, max(low, float(match.group(0).replace(",", "."))))


# Per-example results ---------------------------------------------------------

def _choice_result(gold, pred):
    return {"acc": float(pred == gold), "f1_macro": (gold, pred)}


def mc_generated(doc, results):
    return _choice_result(doc["answer"], find_letter(results[0], mc_letters(doc)))


def mc_likeliest(doc, results):
    lls = [ll for ll, _ in results]
    return _choice_result(doc["answer"], LETTERS[lls.index(max(lls))])


def label_generated(doc, results):
    return _choice_result(doc["label"], find_label(results[0], doc["labels"]))


def label_likeliest(doc, results):
    lls = [ll for ll, _ in results]
    return _choice_result(doc["label"], doc["labels"][lls.index(max(lls))])


def yes_no_generated(doc, results):
    return _choice_result(doc["label"], find_label(results[0], ["Sim", "Não"]))


def sts_generated(doc, results):
    pred = find_score(results[0])
    return {"pearson": (doc["score"], pred), "mse": (doc["score"] - pred) ** 2}


# Aggregations ----------------------------------------------------------------

def f1_macro(items):
    """Macro F1 over the gold classes; an unreadable answer counts as wrong for every class."""
    golds = [g for g, _ in items]
    classes = sorted(set(golds))
    scores = []
    for c in classes:
        tp = sum(1 for g, p in items if g == c and p == c)
        fp = sum(1 for g, p in items if g != c and p == c)
        fn = sum(1 for g, p in items if g == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def pearson(items):
    """Pearson correlation; NaN when either side is constant (no correlation is defined)."""
    n = len(items)
    if n < 2:
        return math.nan
    xs, ys = [g for g, _ in items], [p for _, p in items]
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def mean(items):
    return sum(items) / len(items) if items else math.nan
