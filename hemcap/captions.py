"""Captions: render attributes as expert prose, paraphrase it, and parse any caption back.

``render`` fills a schema template with canonical words; ``paraphrase`` picks a template,
clause forms and synonyms at random (seeded) and shuffles list order, so training sees varied
wording; ``parse`` finds the schema's phrases in any text and maps them back to values.

The parser knows every phrase any clause form can produce (the cartesian product of its slots'
words), normalised the same way as the text (lower case, no hyphens or articles, one spelling).
It matches them through one trie-shaped regular expression, leftmost-longest, so "small pink
granules" wins over a shorter phrase inside it. Two different values for one field are a
contradiction: the field comes back as None and the contradiction is reported, never guessed.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import Mapping

from hemcap.schema import Form, Schema, SchemaError, format_text, get_schema, template_lists

_ARTICLES = frozenset({"a", "an", "the"})
# One spelling for the words captions use, so either spelling parses.
_SPELLING = {"color": "colour", "colored": "coloured", "leukemia": "leukaemia", "gray": "grey"}
_BOUNDARY = "|"  # stands for punctuation, so no phrase matches across a clause break
_TOKEN = re.compile(r"n\s*[:/]\s*c(?![^\W_])|[^\W_]+|[.,;:!?()\[\]{}]", re.UNICODE | re.IGNORECASE)
_AN = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


class CaptionError(ValueError):
    """Attributes that cannot be rendered (missing field, unknown value)."""


def normalize_tokens(text: str) -> list[str]:
    """Lower-case word tokens of ``text``; punctuation becomes a boundary token.

    The parser's hot path: `_normal_token`'s rules inlined, about 1.5x faster than calling it.
    """
    tokens: list[str] = []
    append = tokens.append
    for token in _TOKEN.findall(text.lower()):
        if not token[0].isalnum():
            append(_BOUNDARY)
        elif token[0] == "n" and len(token) > 1 and not token[1].isalnum():
            append("nc")
        elif token not in _ARTICLES:
            append(_SPELLING.get(token, token))
    return tokens


def _normal_token(raw: str) -> str | None:
    token = raw.lower()
    if token[0] == "n" and len(token) > 1 and not token[1].isalnum():
        return "nc"  # "N:C", "n / c"
    if not token[0].isalnum():
        return _BOUNDARY
    if token in _ARTICLES:
        return None
    return _SPELLING.get(token, token)


def _normal_tokens(text: str) -> list[tuple[str, re.Match]]:
    """``(token, match)`` pairs: each normalised token and where it came from in ``text``."""
    pairs = ((_normal_token(m.group()), m) for m in _TOKEN.finditer(text))
    return [(token, m) for token, m in pairs if token]


def normalize(text: str) -> str:
    """The form the parser matches on: ``"A band-shaped nucleus;"`` -> ``"band shaped nucleus |"``."""
    return " ".join(normalize_tokens(text))


def tidy(text: str) -> str:
    """Generated text as a person writes it: WordPiece decoding leaves "band - shaped", "n : c",
    "ratio ;" and a lower-case start. Parsing is unaffected (it normalises all of these)."""
    text = _SPACED_NC.sub("N:C", text)
    text = _SPACED_HYPHEN.sub("-", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


_SPACED_NC = re.compile(r"\bn\s*:\s*c\b", re.IGNORECASE)
_SPACED_HYPHEN = re.compile(r"(?<=\w) - (?=\w)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,;:.!?])")
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")


# ---------------------------------------------------------------------------------- rendering


def render(attributes: Mapping[str, str], schema: str | Schema = "wbcatt", variant: int = 0) -> str:
    """The caption for ``attributes`` in template ``variant`` with canonical wording."""
    schema = get_schema(schema)
    _check(schema, attributes)
    if not 0 <= variant < len(schema.templates):
        raise CaptionError(f"variant {variant} out of range: {schema.name} has {len(schema.templates)} templates")
    return _fill(schema.templates[variant], schema, attributes, rng=None)


def paraphrase(attributes: Mapping[str, str], schema: str | Schema = "wbcatt", seed: int = 0) -> str:
    """A seeded variation: random template, clause forms, synonyms and list order."""
    schema = get_schema(schema)
    _check(schema, attributes)
    rng = random.Random(seed)
    frame = list(rng.choice(schema.templates))
    if len(frame) > 2 and rng.random() < 0.5:
        tail = frame[1:]
        rng.shuffle(tail)  # the first sentence names the cell; the rest may come in any order
        frame = frame[:1] + tail
    return _fill(frame, schema, attributes, rng=rng)


def caption_variants(
    attributes: Mapping[str, str], schema: str | Schema = "wbcatt", n_paraphrases: int = 4, seed: int = 0
) -> list[str]:
    """Every template's canonical caption, then ``n_paraphrases`` seeded paraphrases."""
    schema = get_schema(schema)
    rendered = [render(attributes, schema, v) for v in range(len(schema.templates))]
    return rendered + [paraphrase(attributes, schema, seed * 1_000_003 + k) for k in range(n_paraphrases)]


def _check(schema: Schema, attributes: Mapping[str, str]) -> None:
    problems = schema.check_attributes(attributes)
    if problems:
        raise CaptionError("; ".join(problems))


def _fill(frame, schema: Schema, attributes, rng: random.Random | None) -> str:
    sentences = [_fill_sentence(s, schema, attributes, rng) for s in frame]
    text = ". ".join(s[:1].upper() + s[1:] for s in sentences) + "."
    return _AN.sub(r"\1n ", text)


def _fill_sentence(sentence: str, schema: Schema, attributes, rng) -> str:
    def fill_list(match: re.Match) -> str:
        items = [i.strip() for i in match.group(1).split(",")]
        if rng is not None:
            rng.shuffle(items)
        return _join_list([_fill_slots(i, schema, attributes, rng) for i in items])

    parts, last = [], 0
    for match in template_lists(sentence):
        parts += [_fill_slots(sentence[last : match.start()], schema, attributes, rng), fill_list(match)]
        last = match.end()
    parts.append(_fill_slots(sentence[last:], schema, attributes, rng))
    return "".join(parts)


def _fill_slots(text: str, schema: Schema, attributes, rng) -> str:
    return format_text(text, _ClauseWords(schema, attributes, rng))


class _ClauseWords(dict):
    """Lazily renders ``{clause}`` slots for `format_text`."""

    def __init__(self, schema: Schema, attributes, rng):
        super().__init__()
        self.schema, self.attributes, self.rng = schema, attributes, rng

    def __missing__(self, clause: str) -> str:
        allowed = [f for f in self.schema.clauses[clause] if f.allows(self.attributes)]
        forms = [f for f in allowed if not f.fallback] or allowed
        form = forms[0] if self.rng is None else self.rng.choice(forms)
        return format_text(form.text, {s: self._word(s) for s in form.slots})

    def _word(self, field: str) -> str:
        words = self.schema.fields[field].words[self.attributes[field]]
        return words[0] if self.rng is None else self.rng.choice(words)


def _join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ------------------------------------------------------------------------------------ parsing


class ParsedAttributes(dict):
    """``parse``'s result: field -> value or None, with the evidence behind it.

    It compares equal to a plain dict, so ``parse(render(a)) == a`` reads naturally.
    """

    contradictions: dict[str, tuple[str, ...]]

    def __init__(self, values: dict, contradictions: dict):
        super().__init__(values)
        self.contradictions = contradictions  # field -> every value the text claimed

    @property
    def stated(self) -> list[str]:
        """Fields the text states without contradiction."""
        return [k for k, v in self.items() if v is not None]


def parse(text: str, schema: str | Schema = "wbcatt") -> ParsedAttributes:
    """Attributes stated in ``text``; None where it says nothing or contradicts itself."""
    return compiled_parser(schema).parse(text)


_PARSERS: dict[int, "Parser"] = {}


def compiled_parser(schema: str | Schema) -> "Parser":
    """The parser for ``schema``, built on first use (about 50 ms) and kept."""
    schema = get_schema(schema)
    parser = _PARSERS.get(id(schema))
    if parser is None or parser.schema is not schema:
        parser = _PARSERS[id(schema)] = Parser(schema)
    return parser


@dataclass(frozen=True)
class PhraseMatch:
    """A phrase found in a text, where it stands, and what it states."""

    phrase: str  # normalised
    start: int  # first normalised token
    end: int  # one past the last normalised token
    char_start: int  # the span in the original text
    char_end: int
    assignment: Mapping[str, str]


class Parser:
    """Phrase matcher for one schema. Build once (``compiled_parser``), reuse for every caption."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.assignments = phrase_table(schema)
        self._pairs = {phrase: tuple(a.items()) for phrase, a in self.assignments.items()}
        self.pattern = re.compile(r"(?<!\S)(?:" + _trie_regex(self.assignments) + r")(?!\S)")

    def matches(self, text: str) -> list[PhraseMatch]:
        """Every phrase in ``text`` with its span, e.g. to find the tokens behind an attribute."""
        tokens = _normal_tokens(text)
        normal = " ".join(token for token, _ in tokens)
        found = []
        for m in self.pattern.finditer(normal):
            start = normal.count(" ", 0, m.start())
            end = start + m.group().count(" ") + 1
            span = (tokens[start][1].start(), tokens[end - 1][1].end())
            found.append(PhraseMatch(m.group(), start, end, *span, self.assignments[m.group()]))
        return found

    def parse(self, text: str) -> ParsedAttributes:
        """The hot path (>= 20,000 captions/s): one regex pass, then a dict per phrase."""
        values = dict.fromkeys(self.schema.field_names)
        clashes: dict[str, set[str]] = {}
        for phrase in self.pattern.findall(normalize(text)):
            for field, value in self._pairs[phrase]:
                first = values[field]
                if first is None and field not in clashes:
                    values[field] = value
                elif first != value:
                    clashes.setdefault(field, {first} - {None}).add(value)
                    values[field] = None
        return ParsedAttributes(values, {f: tuple(sorted(v)) for f, v in clashes.items()})


def phrase_table(schema: Schema) -> dict[str, dict[str, str]]:
    """Every normalised phrase the schema's clause forms can produce -> the values it states.

    Raises SchemaError if one phrase would state two different things.
    """
    table: dict[str, dict[str, str]] = {}
    conflicts = []
    for clause, forms in [*schema.clauses.items(), ("extra_forms", schema.extra_forms)]:
        for form in forms:
            for phrase, assignment in _expand(schema, form):
                previous = table.setdefault(phrase, assignment)
                if previous != assignment:
                    conflicts.append(f"{clause}: {phrase!r} states {assignment} and {previous}")
    if conflicts:
        raise SchemaError(f"schema {schema.name}: ambiguous phrases:\n  - " + "\n  - ".join(conflicts[:20]))
    return table


def _expand(schema: Schema, form: Form):
    options = []
    for slot in form.slots:
        allowed = form.when.get(slot, schema.fields[slot].words.keys())
        options.append([(v, w) for v in allowed for w in schema.fields[slot].words[v]])
    for combo in itertools.product(*options):
        words = {slot: word for slot, (_, word) in zip(form.slots, combo)}
        assignment = {slot: value for slot, (value, _) in zip(form.slots, combo)} | form.implied
        yield normalize(format_text(form.text, words)), assignment


def _trie_regex(phrases) -> str:
    """A regex matching exactly ``phrases``, shaped as a trie so matching is one pass in C.

    Greedy optional tails make it prefer the longest phrase at each position.
    """
    trie: dict = {}
    for phrase in phrases:
        node = trie
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}
    return _node_regex(trie)


def _node_regex(node: dict) -> str:
    branches = [re.escape(ch) + _node_regex(child) for ch, child in sorted(node.items()) if ch]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if "" in node:
        return "(?:" + body + ")?"
    return body
