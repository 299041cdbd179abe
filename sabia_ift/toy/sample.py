"""Deterministic generator of the bundled sample data set.

``data/sample/instructions.jsonl`` lets the whole pipeline run (and be tested)
without downloading anything. Every row is a short Portuguese (Brazilian)
instruction whose answer can be recomputed from the instruction and input
alone, so a verifier (tests/sample_verifier.py) can prove that the answers are right and an evaluation
on this set has a meaning. All sentences and fact tables were written for this
project (Apache-2.0); nothing is copied from another data set.

Regenerate the committed file with::

    python -m sabia_ift.toy.sample data/sample/instructions.jsonl

The file holds ``N_ROWS`` (1,200) rows. A few defects are planted on purpose so
that the pipeline's cleaning filters have something visible to count. Their
0-based positions are fixed and do not depend on the seed:

* 4 exact duplicates: rows 300, 555, 801 and 1122 are copies of rows 12, 140,
  420 and 777 (``DUPLICATE_SOURCES``);
* 2 rows with an empty ``output``: rows 404 and 963;
* 1 row whose ``instruction`` is whitespace only: row 618.

``PLANTED_DEFECTS`` maps each of these positions to its kind and
``is_planted_defect`` answers for a position (or, for the empty and blank rows,
for the row itself). Every other row is unique in (instruction, input) and
its answer is right.

Task families (``FAMILIES``): addition, subtraction, multiplication, exact
division, number to words ("por extenso", 0..9999), words to digits, even or
odd, larger/smaller of two numbers, successor/predecessor, Celsius to
Fahrenheit, next/previous weekday, next/previous month, capitals and
abbreviations of the 26 states and the Distrito Federal, plural of nouns,
letter count, alphabetical order, word count, upper/lower case, reversed word
order and first/last word of a sentence. Each family has 3 to 5 phrasings.
"""

from __future__ import annotations

import argparse
import random
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..io import write_jsonl

Row = dict[str, str]
Fields = Mapping[str, str]

KEYS: tuple[str, str, str] = ("instruction", "input", "output")

N_ROWS = 1200
DUPLICATE_SOURCES: dict[int, int] = {300: 12, 555: 140, 801: 420, 1122: 777}
EMPTY_OUTPUT_ROWS: tuple[int, ...] = (404, 963)
BLANK_INSTRUCTION_ROWS: tuple[int, ...] = (618,)
# A tab as well as spaces, so that a filter testing only `== " "` or only
# `== ""` is caught.
BLANK_INSTRUCTION = " \t "

PLANTED_DEFECTS: dict[int, str] = {
    **{i: "duplicate" for i in DUPLICATE_SOURCES},
    **{i: "empty_output" for i in EMPTY_OUTPUT_ROWS},
    **{i: "blank_instruction" for i in BLANK_INSTRUCTION_ROWS},
}


# --------------------------------------------------------------------------
# Numbers


_UNITS = (
    "zero", "um", "dois", "três", "quatro", "cinco", "seis", "sete", "oito",
    "nove", "dez", "onze", "doze", "treze", "catorze", "quinze", "dezesseis",
    "dezessete", "dezoito", "dezenove",
)
_TENS = (
    "", "", "vinte", "trinta", "quarenta", "cinquenta", "sessenta", "setenta",
    "oitenta", "noventa",
)
_HUNDREDS = (
    "", "cento", "duzentos", "trezentos", "quatrocentos", "quinhentos",
    "seiscentos", "setecentos", "oitocentos", "novecentos",
)


def _words_below_thousand(n: int) -> str:
    # "cem" only when nothing follows; otherwise "cento e ...".
    if n == 100:
        return "cem"
    hundreds, rest = divmod(n, 100)
    parts: list[str] = []
    if hundreds:
        parts.append(_HUNDREDS[hundreds])
    if rest:
        if rest < 20:
            parts.append(_UNITS[rest])
        else:
            tens, units = divmod(rest, 10)
            parts.append(_TENS[tens] + (f" e {_UNITS[units]}" if units else ""))
    return " e ".join(parts)


def number_to_words(n: int) -> str:
    """Cardinal number in Brazilian Portuguese words (masculine), 0..9999."""
    if not 0 <= n <= 9999:
        raise ValueError(f"number_to_words supports 0..9999, got {n}")
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    if not thousands:
        return _words_below_thousand(rest)
    # "mil", never "um mil".
    head = "mil" if thousands == 1 else f"{_UNITS[thousands]} mil"
    if not rest:
        return head
    # The "e" after "mil" appears only when the rest is below 100 or a round
    # hundred: "dois mil e quinze", "mil e trezentos", but
    # "mil novecentos e noventa e nove".
    joiner = " e " if rest < 100 or rest % 100 == 0 else " "
    return head + joiner + _words_below_thousand(rest)


@lru_cache(maxsize=1)
def _words_to_number_table() -> dict[str, int]:
    return {number_to_words(i): i for i in range(10000)}


def words_to_number(text: str) -> int:
    """Inverse of ``number_to_words``; raises KeyError for anything else."""
    return _words_to_number_table()[text]


_NUMBER_PATTERN = r"-?\d{1,3}(?:\.\d{3})*"


def format_int(n: int) -> str:
    """Integer with the Brazilian thousands separator: 1999 -> "1.999"."""
    # The "," format option is locale-independent, unlike "n".
    text = f"{abs(n):,}".replace(",", ".")
    return f"-{text}" if n < 0 else text


def parse_int(text: str) -> int:
    """Inverse of ``format_int``; rejects any other spelling."""
    if not re.fullmatch(_NUMBER_PATTERN, text):
        raise ValueError(f"not a number: {text!r}")
    value = int(text.replace(".", ""))
    # Only the canonical spelling counts, so "1999" or "01" cannot sneak in.
    if format_int(value) != text:
        raise ValueError(f"not canonically written: {text!r}")
    return value


# --------------------------------------------------------------------------
# Fact tables (written for this project)


_WEEKDAYS = (
    "domingo", "segunda-feira", "terça-feira", "quarta-feira", "quinta-feira",
    "sexta-feira", "sábado",
)
_MONTHS = (
    "janeiro", "fevereiro", "março", "abril", "maio", "junho", "julho",
    "agosto", "setembro", "outubro", "novembro", "dezembro",
)


@dataclass(frozen=True)
class UF:
    """A Brazilian federative unit: name, name with its preposition, code, capital."""

    name: str
    of_name: str
    code: str
    capital: str


_UFS: tuple[UF, ...] = (
    UF("Acre", "do Acre", "AC", "Rio Branco"),
    UF("Alagoas", "de Alagoas", "AL", "Maceió"),
    UF("Amapá", "do Amapá", "AP", "Macapá"),
    UF("Amazonas", "do Amazonas", "AM", "Manaus"),
    UF("Bahia", "da Bahia", "BA", "Salvador"),
    UF("Ceará", "do Ceará", "CE", "Fortaleza"),
    UF("Distrito Federal", "do Distrito Federal", "DF", "Brasília"),
    UF("Espírito Santo", "do Espírito Santo", "ES", "Vitória"),
    UF("Goiás", "de Goiás", "GO", "Goiânia"),
    UF("Maranhão", "do Maranhão", "MA", "São Luís"),
    UF("Mato Grosso", "de Mato Grosso", "MT", "Cuiabá"),
    UF("Mato Grosso do Sul", "de Mato Grosso do Sul", "MS", "Campo Grande"),
    UF("Minas Gerais", "de Minas Gerais", "MG", "Belo Horizonte"),
    UF("Pará", "do Pará", "PA", "Belém"),
    UF("Paraíba", "da Paraíba", "PB", "João Pessoa"),
    UF("Paraná", "do Paraná", "PR", "Curitiba"),
    UF("Pernambuco", "de Pernambuco", "PE", "Recife"),
    UF("Piauí", "do Piauí", "PI", "Teresina"),
    UF("Rio de Janeiro", "do Rio de Janeiro", "RJ", "Rio de Janeiro"),
    UF("Rio Grande do Norte", "do Rio Grande do Norte", "RN", "Natal"),
    UF("Rio Grande do Sul", "do Rio Grande do Sul", "RS", "Porto Alegre"),
    UF("Rondônia", "de Rondônia", "RO", "Porto Velho"),
    UF("Roraima", "de Roraima", "RR", "Boa Vista"),
    UF("Santa Catarina", "de Santa Catarina", "SC", "Florianópolis"),
    UF("São Paulo", "de São Paulo", "SP", "São Paulo"),
    UF("Sergipe", "de Sergipe", "SE", "Aracaju"),
    UF("Tocantins", "do Tocantins", "TO", "Palmas"),
)
_UF_BY_NAME = {uf.name: uf for uf in _UFS}
_UF_BY_OF_NAME = {uf.of_name: uf for uf in _UFS}
_UF_BY_CODE = {uf.code: uf for uf in _UFS}
_UF_BY_CAPITAL = {uf.capital: uf for uf in _UFS}

# Regular plurals, the -l/-m/-s/-r/-z endings and the three -ão patterns;
# nouns with two accepted plurals (vulcão, verão, ...) are left out so that
# exactly one answer is right.
_PLURALS: tuple[tuple[str, str], ...] = (
    ("casa", "casas"), ("livro", "livros"), ("mesa", "mesas"),
    ("janela", "janelas"), ("cidade", "cidades"), ("escola", "escolas"),
    ("flor", "flores"), ("mar", "mares"), ("colher", "colheres"),
    ("luz", "luzes"), ("rapaz", "rapazes"), ("nariz", "narizes"),
    ("papel", "papéis"), ("anel", "anéis"), ("hotel", "hotéis"),
    ("animal", "animais"), ("jornal", "jornais"), ("quintal", "quintais"),
    ("farol", "faróis"), ("lençol", "lençóis"), ("anzol", "anzóis"),
    ("funil", "funis"), ("barril", "barris"), ("fóssil", "fósseis"),
    ("mês", "meses"), ("país", "países"), ("freguês", "fregueses"),
    ("gás", "gases"), ("lápis", "lápis"), ("ônibus", "ônibus"),
    ("homem", "homens"), ("jovem", "jovens"), ("nuvem", "nuvens"),
    ("viagem", "viagens"), ("som", "sons"), ("atum", "atuns"),
    ("álbum", "álbuns"),
    ("mão", "mãos"), ("irmão", "irmãos"), ("cidadão", "cidadãos"),
    ("cristão", "cristãos"), ("órgão", "órgãos"), ("grão", "grãos"),
    ("chão", "chãos"),
    ("pão", "pães"), ("cão", "cães"), ("alemão", "alemães"),
    ("capitão", "capitães"),
    ("leão", "leões"), ("limão", "limões"), ("avião", "aviões"),
    ("coração", "corações"), ("balão", "balões"), ("botão", "botões"),
    ("canção", "canções"), ("estação", "estações"), ("melão", "melões"),
    ("feijão", "feijões"), ("caminhão", "caminhões"), ("sabão", "sabões"),
    ("lição", "lições"), ("opinião", "opiniões"), ("televisão", "televisões"),
    ("questão", "questões"),
)
_PLURAL_OF = dict(_PLURALS)

# Single words without hyphens, so that "letters" and "alphabetical order" have
# one obvious meaning; the accent-free spellings are all different, so sorting
# never has to break a tie.
_WORD_BANK: tuple[str, ...] = (
    "abacaxi", "banana", "maçã", "uva", "laranja", "limão", "café", "pão",
    "açúcar", "árvore", "janela", "cadeira", "escola", "ônibus", "avião",
    "bicicleta", "caneta", "lápis", "livro", "mesa", "relógio", "telefone",
    "música", "óculos", "chave", "sapato", "camisa", "jardim", "floresta",
    "montanha", "praia", "rio", "lua", "estrela", "sol", "nuvem", "chuva",
    "vento", "gato", "cachorro", "pássaro", "tartaruga", "coelho", "leão",
    "girafa", "elefante", "borboleta", "formiga", "abelha", "peixe",
    "cenoura", "tomate", "batata", "feijão", "arroz", "queijo", "manteiga",
    "iogurte", "xícara", "garfo", "colher", "panela", "travesseiro",
    "cobertor", "espelho", "tesoura", "agulha", "joelho", "coração",
    "canção", "família", "vizinho", "público", "exército", "ilha",
    "hospital", "farmácia", "biblioteca", "dicionário", "zebra", "quintal",
    "violão", "mochila", "guarda", "ônix", "ímã", "úmido", "caju", "jabuti",
)

# Sentences are assembled from these parts so that hundreds of them exist
# without punctuation inside, which keeps "word", "first word" and "reversed
# order" unambiguous.
_SUBJECTS = (
    "O professor", "A minha avó", "O nosso vizinho", "A cozinheira",
    "O motorista do ônibus", "A minha irmã mais nova", "O menino da esquina",
    "A médica", "O carteiro", "A bibliotecária", "O meu primo",
    "A dona da padaria", "O pescador",
)
_VERBS = (
    "comprou", "encontrou", "guardou", "levou", "vendeu", "trouxe",
    "esqueceu", "emprestou", "consertou", "procurou",
)
_OBJECTS = (
    "um livro antigo", "a bicicleta azul", "o guarda-chuva preto",
    "uma cadeira de madeira", "o rádio velho", "a caixa de ferramentas",
    "um relógio de parede", "a mala vermelha", "o violão", "uma lanterna",
    "o caderno de receitas", "a cafeteira elétrica",
)
_COMPLEMENTS = (
    "", "na feira", "ontem à tarde", "perto da praça", "no sábado de manhã",
    "depois do almoço", "na estação de trem", "antes da chuva",
    "durante as férias", "sem pressa", "na semana passada",
    "com muito cuidado",
)


def _make_sentence(rng: random.Random) -> str:
    parts = [
        rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS),
        rng.choice(_COMPLEMENTS),
    ]
    return " ".join(p for p in parts if p)


def alphabetical_key(word: str) -> tuple[str, str]:
    """Dictionary order: accents and case ignored, the word itself breaks ties."""
    stripped = "".join(
        ch for ch in unicodedata.normalize("NFD", word) if not unicodedata.combining(ch)
    )
    return (stripped.casefold(), word)


# --------------------------------------------------------------------------
# Templates


def _template_fields(template: str) -> tuple[str, ...]:
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class Variant:
    """One phrasing of a task: instruction template and input template ("" = none)."""

    instruction: str
    input: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(
            dict.fromkeys(_template_fields(self.instruction) + _template_fields(self.input))
        )

@dataclass(frozen=True)
class Family:
    """A task: how to draw its values, how to phrase it and how to answer it.

    ``answer`` sees only the fields that the chosen phrasing shows, exactly as
    the verifier in tests will later parse them back out of the text.
    """

    name: str
    quota: int
    variants: tuple[Variant, ...]
    sample: Callable[[random.Random], dict[str, str]]
    answer: Callable[[Fields], str]


# --------------------------------------------------------------------------
# Families


def _two_numbers(lo: int, hi: int, *, distinct: bool = False) -> Callable[[random.Random], dict[str, str]]:
    def sample(rng: random.Random) -> dict[str, str]:
        a = rng.randint(lo, hi)
        b = rng.randint(lo, hi)
        while distinct and b == a:
            b = rng.randint(lo, hi)
        return {"a": format_int(a), "b": format_int(b)}

    return sample


def _sample_subtraction(rng: random.Random) -> dict[str, str]:
    a, b = sorted((rng.randint(2, 1999), rng.randint(1, 999)), reverse=True)
    return {"a": format_int(a), "b": format_int(b)}


def _sample_multiplication(rng: random.Random) -> dict[str, str]:
    return {"a": format_int(rng.randint(2, 99)), "b": format_int(rng.randint(2, 30))}


def _sample_division(rng: random.Random) -> dict[str, str]:
    divisor = rng.randint(2, 12)
    quotient = rng.randint(2, 150)
    return {"a": format_int(divisor * quotient), "b": format_int(divisor)}


def _sample_number(lo: int, hi: int) -> Callable[[random.Random], dict[str, str]]:
    def sample(rng: random.Random) -> dict[str, str]:
        return {"n": format_int(rng.randint(lo, hi))}

    return sample


def _sample_spelled_number(rng: random.Random) -> dict[str, str]:
    # Spread over magnitudes: uniform over 0..9999 would be 90% four-digit.
    lo, hi = rng.choice(((0, 20), (21, 99), (100, 999), (100, 999), (1000, 9999), (1000, 9999)))
    n = rng.randint(lo, hi)
    return {"n": format_int(n), "extenso": number_to_words(n)}


def _sample_celsius(rng: random.Random) -> dict[str, str]:
    # Multiples of 5 give whole Fahrenheit values.
    return {"c": format_int(rng.randrange(-40, 101, 5))}


def _sample_weekday(rng: random.Random) -> dict[str, str]:
    return {"dia": rng.choice(_WEEKDAYS)}


def _sample_month(rng: random.Random) -> dict[str, str]:
    return {"mes": rng.choice(_MONTHS)}


def _sample_uf(rng: random.Random) -> dict[str, str]:
    uf = rng.choice(_UFS)
    return {"uf": uf.name, "de_uf": uf.of_name, "sigla": uf.code, "capital": uf.capital}


def _sample_plural(rng: random.Random) -> dict[str, str]:
    return {"singular": rng.choice(_PLURALS)[0]}


def _sample_word(rng: random.Random) -> dict[str, str]:
    return {"palavra": rng.choice(_WORD_BANK)}


def _sample_word_list(rng: random.Random) -> dict[str, str]:
    words = rng.sample(_WORD_BANK, rng.randint(4, 7))
    return {"lista": ", ".join(words)}


def _sample_sentence(rng: random.Random) -> dict[str, str]:
    return {"frase": _make_sentence(rng)}


def _sample_upper_sentence(rng: random.Random) -> dict[str, str]:
    return {"frase": _make_sentence(rng).upper()}


def _uf_of(fields: Fields) -> UF:
    if "de_uf" in fields:
        return _UF_BY_OF_NAME[fields["de_uf"]]
    if "uf" in fields:
        return _UF_BY_NAME[fields["uf"]]
    if "capital" in fields:
        return _UF_BY_CAPITAL[fields["capital"]]
    return _UF_BY_CODE[fields["sigla"]]


def _number_of(fields: Fields) -> int:
    if "n" in fields:
        return parse_int(fields["n"])
    return words_to_number(fields["extenso"])


def _answer_sum(f: Fields) -> str:
    total = parse_int(f["a"]) + parse_int(f["b"])
    return f"A soma de {f['a']} e {f['b']} é {format_int(total)}."


def _answer_difference(f: Fields) -> str:
    a, b = parse_int(f["a"]), parse_int(f["b"])
    if a < b:
        raise ValueError("the sample set only asks for non-negative differences")
    return f"A diferença entre {f['a']} e {f['b']} é {format_int(a - b)}."


def _answer_product(f: Fields) -> str:
    product = parse_int(f["a"]) * parse_int(f["b"])
    return f"O produto de {f['a']} por {f['b']} é {format_int(product)}."


def _answer_quotient(f: Fields) -> str:
    quotient, remainder = divmod(parse_int(f["a"]), parse_int(f["b"]))
    if remainder:
        raise ValueError("the sample set only asks for exact divisions")
    return f"O resultado de {f['a']} dividido por {f['b']} é {format_int(quotient)}."


def _answer_to_words(f: Fields) -> str:
    return f"Por extenso, {f['n']} se escreve {number_to_words(parse_int(f['n']))}."


def _answer_to_digits(f: Fields) -> str:
    return f"Em algarismos, “{f['extenso']}” se escreve {format_int(words_to_number(f['extenso']))}."


def _answer_parity(f: Fields) -> str:
    if parse_int(f["n"]) % 2 == 0:
        return f"O número {f['n']} é par, pois é divisível por 2."
    return f"O número {f['n']} é ímpar, pois não é divisível por 2."


def _answer_larger(f: Fields) -> str:
    a, b = parse_int(f["a"]), parse_int(f["b"])
    if a == b:
        raise ValueError("equal numbers have no larger one")
    return f"Entre {f['a']} e {f['b']}, o maior número é {format_int(max(a, b))}."


def _answer_smaller(f: Fields) -> str:
    a, b = parse_int(f["a"]), parse_int(f["b"])
    if a == b:
        raise ValueError("equal numbers have no smaller one")
    return f"Entre {f['a']} e {f['b']}, o menor número é {format_int(min(a, b))}."


def _answer_successor(f: Fields) -> str:
    return f"O sucessor de {f['n']} é {format_int(parse_int(f['n']) + 1)}."


def _answer_predecessor(f: Fields) -> str:
    return f"O antecessor de {f['n']} é {format_int(parse_int(f['n']) - 1)}."


def _answer_fahrenheit(f: Fields) -> str:
    celsius = parse_int(f["c"])
    if celsius * 9 % 5:
        raise ValueError("the sample set only uses whole Fahrenheit values")
    return f"A temperatura de {f['c']} °C equivale a {format_int(celsius * 9 // 5 + 32)} °F."


def _answer_next_day(f: Fields) -> str:
    following = _WEEKDAYS[(_WEEKDAYS.index(f["dia"]) + 1) % 7]
    return f"Depois de {f['dia']} vem {following}."


def _answer_previous_day(f: Fields) -> str:
    previous = _WEEKDAYS[(_WEEKDAYS.index(f["dia"]) - 1) % 7]
    return f"Antes de {f['dia']} vem {previous}."


def _answer_next_month(f: Fields) -> str:
    following = _MONTHS[(_MONTHS.index(f["mes"]) + 1) % 12]
    return f"O mês seguinte a {f['mes']} é {following}."


def _answer_previous_month(f: Fields) -> str:
    previous = _MONTHS[(_MONTHS.index(f["mes"]) - 1) % 12]
    return f"O mês anterior a {f['mes']} é {previous}."


def _answer_capital(f: Fields) -> str:
    uf = _uf_of(f)
    return f"A capital {uf.of_name} é {uf.capital}."


def _answer_code(f: Fields) -> str:
    uf = _uf_of(f)
    return f"{uf.code} é a sigla {uf.of_name}."


def _answer_plural(f: Fields) -> str:
    return f"O plural de “{f['singular']}” é “{_PLURAL_OF[f['singular']]}”."


def _answer_letters(f: Fields) -> str:
    count = sum(ch.isalpha() for ch in f["palavra"])
    noun = "letra" if count == 1 else "letras"
    return f"A palavra “{f['palavra']}” tem {count} {noun}."


def _answer_sorted(f: Fields) -> str:
    words = sorted(f["lista"].split(", "), key=alphabetical_key)
    return f"Em ordem alfabética, as palavras ficam: {', '.join(words)}."


def _answer_word_count(f: Fields) -> str:
    count = len(f["frase"].split())
    noun = "palavra" if count == 1 else "palavras"
    return f"A frase informada tem {count} {noun}."


def _answer_upper(f: Fields) -> str:
    return f"Em letras maiúsculas, a frase fica: {f['frase'].upper()}."


def _answer_lower(f: Fields) -> str:
    return f"Em letras minúsculas, a frase fica: {f['frase'].lower()}."


def _answer_reversed(f: Fields) -> str:
    return f"Com as palavras em ordem inversa, a frase fica: {' '.join(reversed(f['frase'].split()))}."


def _answer_first_word(f: Fields) -> str:
    return f"A primeira palavra da frase é “{f['frase'].split()[0]}”."


def _answer_last_word(f: Fields) -> str:
    return f"A última palavra da frase é “{f['frase'].split()[-1]}”."


V = Variant
FAMILIES: tuple[Family, ...] = (
    Family("soma", 60, (
        V("Quanto é {a} mais {b}?"),
        V("Calcule a soma de {a} e {b}."),
        V("Some {a} com {b}."),
        V("Calcule a soma dos dois números abaixo.", "{a} e {b}"),
        V("Resolva a conta a seguir.", "{a} + {b}"),
    ), _two_numbers(2, 999), _answer_sum),
    Family("subtracao", 50, (
        V("Quanto é {a} menos {b}?"),
        V("Calcule a diferença entre {a} e {b}."),
        V("Subtraia {b} de {a}."),
        V("Resolva a subtração abaixo.", "{a} - {b}"),
    ), _sample_subtraction, _answer_difference),
    Family("multiplicacao", 50, (
        V("Quanto é {a} vezes {b}?"),
        V("Calcule o produto de {a} por {b}."),
        V("Multiplique {a} por {b}."),
        V("Resolva a multiplicação abaixo.", "{a} × {b}"),
    ), _sample_multiplication, _answer_product),
    Family("divisao", 35, (
        V("Quanto é {a} dividido por {b}?"),
        V("Divida {a} por {b}."),
        V("Resolva a divisão abaixo.", "{a} ÷ {b}"),
    ), _sample_division, _answer_quotient),
    Family("por_extenso", 100, (
        V("Escreva o número {n} por extenso."),
        V("Como se escreve {n} por extenso?"),
        V("Escreva por extenso o número abaixo.", "{n}"),
        V("Transforme o número a seguir em palavras.", "{n}"),
    ), _sample_spelled_number, _answer_to_words),
    Family("em_algarismos", 50, (
        V("Escreva em algarismos o número {extenso}."),
        V("Como se escreve “{extenso}” usando algarismos?"),
        V("Converta para algarismos o número escrito por extenso abaixo.", "{extenso}"),
    ), _sample_spelled_number, _answer_to_digits),
    Family("par_ou_impar", 50, (
        V("O número {n} é par ou ímpar?"),
        V("Diga se {n} é par ou ímpar."),
        V("Classifique o número abaixo como par ou ímpar.", "{n}"),
        V("Verifique se o número a seguir é par ou ímpar.", "{n}"),
    ), _sample_number(0, 9999), _answer_parity),
    Family("maior", 35, (
        V("Qual é o maior número: {a} ou {b}?"),
        V("Entre {a} e {b}, qual número é maior?"),
        V("Diga qual dos dois números abaixo é o maior.", "{a} e {b}"),
    ), _two_numbers(1, 9999, distinct=True), _answer_larger),
    Family("menor", 35, (
        V("Qual é o menor número: {a} ou {b}?"),
        V("Entre {a} e {b}, qual número é menor?"),
        V("Diga qual dos dois números abaixo é o menor.", "{a} e {b}"),
    ), _two_numbers(1, 9999, distinct=True), _answer_smaller),
    Family("sucessor", 25, (
        V("Qual é o sucessor de {n}?"),
        V("Que número vem logo depois de {n}?"),
        V("Informe o sucessor do número abaixo.", "{n}"),
    ), _sample_number(0, 9998), _answer_successor),
    Family("antecessor", 25, (
        V("Qual é o antecessor de {n}?"),
        V("Que número vem logo antes de {n}?"),
        V("Informe o antecessor do número abaixo.", "{n}"),
    ), _sample_number(1, 9999), _answer_predecessor),
    Family("celsius_fahrenheit", 45, (
        V("Converta {c} °C para graus Fahrenheit."),
        V("Quanto é {c} °C em graus Fahrenheit?"),
        V("Uma temperatura de {c} °C corresponde a quantos graus Fahrenheit?"),
        V("Converta a temperatura abaixo de Celsius para Fahrenheit.", "{c} °C"),
    ), _sample_celsius, _answer_fahrenheit),
    Family("dia_seguinte", 20, (
        V("Que dia da semana vem depois de {dia}?"),
        V("Se hoje é {dia}, que dia será amanhã?"),
        V("Qual dia da semana vem logo após {dia}?"),
        V("Diga qual dia da semana vem depois do dia informado.", "{dia}"),
    ), _sample_weekday, _answer_next_day),
    Family("dia_anterior", 20, (
        V("Que dia da semana vem antes de {dia}?"),
        V("Se hoje é {dia}, que dia foi ontem?"),
        V("Qual dia da semana vem logo antes de {dia}?"),
        V("Diga qual dia da semana vem antes do dia informado.", "{dia}"),
    ), _sample_weekday, _answer_previous_day),
    Family("mes_seguinte", 30, (
        V("Qual é o mês que vem depois de {mes}?"),
        V("Que mês vem logo após {mes}?"),
        V("Se estamos em {mes}, qual será o próximo mês?"),
        V("Diga qual é o mês seguinte ao mês informado.", "{mes}"),
    ), _sample_month, _answer_next_month),
    Family("mes_anterior", 30, (
        V("Qual é o mês anterior a {mes}?"),
        V("Que mês vem logo antes de {mes}?"),
        V("Se estamos em {mes}, qual foi o mês passado?"),
        V("Diga qual é o mês anterior ao mês informado.", "{mes}"),
    ), _sample_month, _answer_previous_month),
    Family("capital", 80, (
        V("Qual é a capital {de_uf}?"),
        V("Qual cidade é a capital {de_uf}?"),
        V("Diga o nome da capital {de_uf}."),
        V("{capital} é a capital de qual unidade federativa?"),
        V("Informe a capital da unidade federativa abaixo.", "{uf}"),
    ), _sample_uf, _answer_capital),
    Family("sigla", 60, (
        V("Qual é a sigla {de_uf}?"),
        V("Qual unidade federativa tem a sigla {sigla}?"),
        V("A sigla {sigla} representa qual unidade federativa?"),
        V("Escreva a sigla da unidade federativa abaixo.", "{uf}"),
    ), _sample_uf, _answer_code),
    Family("plural", 70, (
        V("Qual é o plural de “{singular}”?"),
        V("Escreva o plural da palavra “{singular}”."),
        V("Como fica “{singular}” no plural?"),
        V("Passe a palavra abaixo para o plural.", "{singular}"),
    ), _sample_plural, _answer_plural),
    Family("contar_letras", 50, (
        V("Quantas letras tem a palavra “{palavra}”?"),
        V("Conte as letras da palavra “{palavra}”."),
        V("Diga quantas letras tem a palavra abaixo.", "{palavra}"),
    ), _sample_word, _answer_letters),
    Family("ordem_alfabetica", 70, (
        V("Coloque as palavras abaixo em ordem alfabética.", "{lista}"),
        V("Ordene alfabeticamente a lista de palavras a seguir.", "{lista}"),
        V("Organize estas palavras em ordem alfabética.", "{lista}"),
        V("Coloque em ordem alfabética: {lista}."),
    ), _sample_word_list, _answer_sorted),
    Family("contar_palavras", 50, (
        V("Quantas palavras tem a frase abaixo?", "{frase}"),
        V("Conte o número de palavras da frase a seguir.", "{frase}"),
        V("Diga quantas palavras há nesta frase.", "{frase}"),
        V("Quantas palavras tem a frase “{frase}”?"),
    ), _sample_sentence, _answer_word_count),
    Family("maiusculas", 35, (
        V("Reescreva a frase abaixo usando apenas letras maiúsculas.", "{frase}"),
        V("Converta a frase a seguir para letras maiúsculas.", "{frase}"),
        V("Passe este texto para caixa alta.", "{frase}"),
    ), _sample_sentence, _answer_upper),
    Family("minusculas", 35, (
        V("Reescreva a frase abaixo usando apenas letras minúsculas.", "{frase}"),
        V("Converta a frase a seguir para letras minúsculas.", "{frase}"),
        V("Passe este texto para caixa baixa.", "{frase}"),
    ), _sample_upper_sentence, _answer_lower),
    Family("inverter_palavras", 40, (
        V("Inverta a ordem das palavras da frase abaixo.", "{frase}"),
        V("Reescreva a frase a seguir com as palavras na ordem inversa.", "{frase}"),
        V("Escreva as palavras desta frase de trás para a frente, sem alterar cada palavra.", "{frase}"),
    ), _sample_sentence, _answer_reversed),
    Family("primeira_palavra", 23, (
        V("Qual é a primeira palavra da frase abaixo?", "{frase}"),
        V("Diga qual palavra abre a frase a seguir.", "{frase}"),
        V("Indique a primeira palavra desta frase.", "{frase}"),
    ), _sample_sentence, _answer_first_word),
    Family("ultima_palavra", 23, (
        V("Qual é a última palavra da frase abaixo?", "{frase}"),
        V("Diga qual palavra encerra a frase a seguir.", "{frase}"),
        V("Indique a última palavra desta frase.", "{frase}"),
    ), _sample_sentence, _answer_last_word),
)
del V

# --------------------------------------------------------------------------
# Generation


def _render(family: Family, variant: Variant, values: Mapping[str, str]) -> Row:
    shown = {name: values[name] for name in variant.fields}
    return {
        "instruction": variant.instruction.format(**shown),
        "input": variant.input.format(**shown),
        "output": family.answer(shown),
    }


def _clean_rows(rng: random.Random, count: int) -> list[Row]:
    quota_total = sum(family.quota for family in FAMILIES)
    if quota_total != count:
        raise RuntimeError(f"family quotas add up to {quota_total}, need {count}")
    rows: list[Row] = []
    seen: set[tuple[str, str]] = set()
    for family in FAMILIES:
        made = 0
        attempts = 0
        while made < family.quota:
            attempts += 1
            # A quota larger than the family's distinct prompts would spin forever.
            if attempts > 200 * family.quota:
                raise RuntimeError(f"family {family.name!r} cannot reach {family.quota} distinct rows")
            variant = rng.choice(family.variants)
            row = _render(family, variant, family.sample(rng))
            key = (row["instruction"], row["input"])
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
            made += 1
    # Families must be interleaved, or any prefix of the file (a quick run
    # with max_rows) would see only arithmetic.
    rng.shuffle(rows)
    return rows


def generate_rows(seed: int = 0) -> list[Row]:
    """All ``N_ROWS`` rows, planted defects included, in file order."""
    rng = random.Random(seed)
    clean = _clean_rows(rng, N_ROWS - len(DUPLICATE_SOURCES))
    source = iter(clean)
    rows: list[Row] = []
    for index in range(N_ROWS):
        kind = PLANTED_DEFECTS.get(index)
        if kind == "duplicate":
            rows.append(dict(rows[DUPLICATE_SOURCES[index]]))
        elif kind == "empty_output":
            rows.append({**next(source), "output": ""})
        elif kind == "blank_instruction":
            rows.append({**next(source), "instruction": BLANK_INSTRUCTION})
        else:
            rows.append(next(source))
    return rows


def write_sample(rows: Iterable[Mapping[str, str]], path: str | Path) -> None:
    """UTF-8 JSONL, keys in ``KEYS`` order."""
    write_jsonl(path, ({key: row[key] for key in KEYS} for row in rows))


def is_planted_defect(row_or_index: int | Mapping[str, str]) -> bool:
    """Whether a position (or row) is one of the deliberately bad ones.

    Given a position, all three kinds are recognised. Given a row, only the
    empty-output and blank-instruction ones are: a planted duplicate is byte
    for byte the row it copies, so only its position tells them apart.
    """
    if isinstance(row_or_index, int):
        return row_or_index in PLANTED_DEFECTS
    return not row_or_index["instruction"].strip() or not row_or_index["output"].strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sabia_ift.toy.sample",
        description="Write the bundled Portuguese sample instruction set as JSONL.",
    )
    parser.add_argument("out_path", type=Path, help="JSONL file to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0, the committed file)")
    args = parser.parse_args(argv)
    rows = generate_rows(args.seed)
    write_sample(rows, args.out_path)
    with_input = sum(1 for row in rows if row["input"])
    print(
        f"wrote {len(rows)} rows ({with_input} with input, {len(PLANTED_DEFECTS)} planted defects) "
        f"to {args.out_path}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
