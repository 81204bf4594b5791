"""Parsing: any caption back into attributes, clause by clause, and where each was read.

The schema's clause forms give exact phrases ("a band-shaped nucleus", "no vacuoles"); people and
chat models also write "the nucleus is bilobed", "Size: large", "without granules", "two lobes".
The schema's ``reading`` section (``data_recipes/*.yaml``) declares the words for those; no
vocabulary lives here. Reading a text:

1. Tokens: lower case, no articles, one spelling; ``. ! ?`` and line breaks end a sentence, other
   punctuation and the schema's break words ("and", "but", "with") end a clause.
2. One leftmost-longest pass of a trie-shaped regular expression finds the terms: phrases, value
   words, topic nouns ("nucleus", "granules"), negations ("no", "without"; "absent" after its noun),
   hedges and doubts ("possibly", "can't be excluded"), contrasts and exclusions ("unlike", "rather
   than") and phrases read as nothing ("toxic granulation"), so no word inside them is read.
   Sentence parts in doubt or about other things, a hedged clause (and what commas join to it), and
   what a contrast or exclusion names are dropped before reading.
3. In each clause a phrase states its values and a noun its topic's ``present`` values; a value
   word states the value of the field its nearest topic can take (a noun of other things, "red
   cells", takes it and states nothing); a word of one field only needs no topic unless its clause
   names topics that cannot take it. A clause without a topic takes the previous clause's in its
   sentence (the next one's when it opens the sentence), so "Shape: irregular" and "small, round,
   agranular lymphocyte" read. A denied noun states its topic's ``absent`` values, a denied word
   the ``absent`` values of a topic whose ``present`` it is, otherwise nothing.

Two values for one field are a contradiction: the field comes back as None and the contradiction
is reported, never guessed. ``parse(render(a)) == a`` holds for every template and paraphrase.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

from hemcap.schema import Form, Schema, SchemaError, Topic, format_text, get_schema

_ARTICLES = frozenset({"a", "an", "the"})
# One spelling for the words captions use, so either spelling parses.
_SPELLING = {"color": "colour", "colored": "coloured", "leukemia": "leukaemia", "gray": "grey", "grayish": "greyish",
             "vacuolization": "vacuolisation", "vacuolized": "vacuolised",
             "neighboring": "neighbouring", "neighbors": "neighbours"}
_TOKEN = re.compile(r"n\s*[:/]\s*c(?![^\W_])|[^\W_]+|[.,;:!?()\[\]{}|\n\u2013\u2014\u2022]|(?<=\s)-(?=\s)",
                    re.UNICODE | re.IGNORECASE)
# Punctuation as the reader sees it: "." ends a sentence, "?" ends one in doubt, ";" and "," (brackets,
# dashes) end a clause; ":" joins a key to its value and ends what "rather than" excludes.
_PUNCTUATION = {".": ".", "!": ".", "?": "?", "\n": ".", ";": ";", ",": ",", "(": ",", ")": ",", "[": ",",
                "]": ",", "{": ",", "}": ",", ":": ":", "-": ";", "\u2013": ";", "\u2014": ";", "|": ";", "\u2022": "."}


def _normal_token(raw: str) -> str | None:
    token = raw.lower()
    if token in _PUNCTUATION:
        return _PUNCTUATION[token]
    if token[0] == "n" and len(token) > 1 and not token[1].isalnum():
        return "nc"  # "N:C", "n / c"
    if token in _ARTICLES:
        return None
    return _SPELLING.get(token, token)


def normalize_tokens(text: str) -> list[str]:
    """Lower-case word tokens of ``text``, punctuation kept as ``.``, ``;``, ``,`` or ``:``.

    The parser's hot path: `_normal_token`'s rules inlined, about 1.5x faster than calling it.
    """
    tokens: list[str] = []
    append = tokens.append
    for token in _TOKEN.findall(text.lower()):
        if not token[0].isalnum():
            append(_PUNCTUATION[token])
        elif token[0] == "n" and len(token) > 1 and not token[1].isalnum():
            append("nc")
        elif token not in _ARTICLES:
            append(_SPELLING.get(token, token))
    return tokens


def _normal_tokens(text: str) -> list[tuple[str, re.Match]]:
    """``(token, match)`` pairs: each normalised token and where it came from in ``text``."""
    pairs = ((_normal_token(m.group()), m) for m in _TOKEN.finditer(text))
    return [(token, m) for token, m in pairs if token]


def normalize(text: str) -> str:
    """The form the parser matches on: ``"A band-shaped nucleus;"`` -> ``"band shaped nucleus ;"``."""
    return " ".join(normalize_tokens(text))


def expand(text: str) -> list[str]:
    """The phrases a reading entry stands for, each once: ``"(red|white) cell(s|)"`` -> red cells, red cell, ...

    The leftmost group is expanded first, so a group nested in one option is expanded only in that
    option: expanding innermost groups first copied every other option once per inner choice (a
    cell_size entry gave 48 copies of each phrase, 56,000 in all, 1 s of each parser build).
    """
    start = text.find("(")
    while start >= 0:
        group = _group(text, start)
        if group is not None:
            end, options = group
            return list(dict.fromkeys(p for option in options for p in expand(text[:start] + option + text[end:])))
        start = text.find("(", start + 1)  # an unclosed "(" is read as itself
    return [text]


def _group(text: str, start: int) -> tuple[int, list[str]] | None:
    """The end of the group opening at ``start`` and its options (split at its own ``|``); None if unclosed."""
    depth, cuts = 0, [start]
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1, [text[a + 1 : b] for a, b in zip(cuts, [*cuts[1:], i])]
        elif text[i] == "|" and depth == 1:
            cuts.append(i)
    return None


# ------------------------------------------------------------------------------ the lexicon

# Kinds of term; from COLON on they structure the text (punctuation, break words) rather than state anything.
(PHRASE, WORD, NOUN, NEGATION, NEGATION_AFTER, IGNORE, HEDGE, DOUBT, CONTRAST, EXCLUSION, OR, COLON, BREAK, OPENER,
 SEMICOLON, COMMA, QUESTION, SENTENCE) = range(18)
AHEAD = -1  # the position of a topic taken from the clause after: "round, | unsegmented nucleus"
# Which kind a phrase of two kinds keeps: "no" is a negation before it is granule_type nil's word.
_PRIORITY = {kind: rank for rank, kind in enumerate((PHRASE, IGNORE, DOUBT, HEDGE, CONTRAST, EXCLUSION, NEGATION_AFTER,
                                                      NEGATION, NOUN, WORD, OR, COLON, COMMA, SEMICOLON, OPENER, BREAK,
                                                      QUESTION, SENTENCE))}


@dataclass(frozen=True)
class Term:
    """What one phrase of the lexicon is: its kind, what it states, the topic it names."""

    kind: int
    states: tuple[tuple[str, str], ...] = ()  # PHRASE, NOUN: the values it states
    options: tuple[tuple[str, str], ...] = ()  # WORD: the values it may state, by its clause's topic
    topic: Topic | None = None  # NOUN, and a PHRASE holding a noun
    denial: tuple[tuple[str, str], ...] = ()  # what denying it states: "no vacuoles", "non-vacuolated"


def build_lexicon(schema: Schema) -> dict[str, Term]:
    """Every normalised phrase the reader knows -> its term; a phrase of two kinds keeps the stronger."""
    lexicon: dict[str, Term] = {}
    nouns = _nouns(schema)
    for phrase, term in itertools.chain(_phrase_terms(schema, nouns), _reading_terms(schema, nouns)):
        held = lexicon.get(phrase)
        if held is None or _PRIORITY[term.kind] < _PRIORITY[held.kind]:
            lexicon[phrase] = term
        elif term.kind == WORD and held.kind == WORD:
            lexicon[phrase] = Term(WORD, options=tuple(dict.fromkeys(held.options + term.options)))
    topics = schema.reading.topics.values()
    return {phrase: dataclasses.replace(term, denial=_denial(term, topics)) for phrase, term in lexicon.items()}


def _denial(term: Term, topics) -> tuple[tuple[str, str], ...]:
    """A term that only mentions a topic (its ``present`` values) states the topic's ``absent`` values
    when denied; any other denied term states nothing."""
    said = set(term.states) or set(term.options)
    for topic in ([term.topic] if term.topic else topics):
        present = set(topic.present.items())
        if topic.absent and said and (said <= present if term.topic else said & present):
            return tuple(topic.absent.items())
    return ()


def _nouns(schema: Schema) -> dict[str, tuple[Topic, tuple[tuple[str, str], ...]]]:
    """Normalised noun -> (its topic, the values it states: the topic's ``present``, a cell type's name)."""
    nouns = {}
    for topic in schema.reading.topics.values():
        present = tuple(topic.present.items())
        for noun in topic.nouns:
            nouns.update({normalize(p): (topic, present) for p in expand(noun)})
        if topic.names:
            words = _value_words(schema, topic.names)
            nouns.update({phrase: (topic, present + ((topic.names, value),)) for phrase, value in words})
    return nouns


def _phrase_terms(schema: Schema, nouns) -> Iterator[tuple[str, Term]]:
    for phrase, assignment in phrase_table(schema).items():
        topic = next((nouns[n][0] for n in _sub_phrases(phrase) if n in nouns), None)
        yield phrase, Term(PHRASE, states=tuple(assignment.items()), topic=topic)


def _sub_phrases(phrase: str) -> Iterator[str]:
    """Every run of whole tokens in ``phrase``, longest first."""
    tokens = phrase.split()
    for length in range(len(tokens), 0, -1):
        for start in range(len(tokens) - length + 1):
            yield " ".join(tokens[start : start + length])


def _reading_terms(schema: Schema, nouns) -> Iterator[tuple[str, Term]]:
    reading = schema.reading
    for kind, entries in ((NEGATION, reading.negations), (NEGATION_AFTER, reading.negations_after),
                          (IGNORE, reading.ignore), (BREAK, reading.breaks), (HEDGE, reading.hedges),
                          (DOUBT, reading.doubts), (CONTRAST, reading.contrasts), (EXCLUSION, reading.exclusions),
                          (OPENER, reading.openers), (OR, reading.alternatives)):
        yield from ((normalize(p), Term(kind)) for entry in entries for p in expand(entry))
    yield from ((";", Term(SEMICOLON)), (",", Term(COMMA)), (":", Term(COLON)), ("?", Term(QUESTION)),
                (".", Term(SENTENCE)))
    yield from ((phrase, Term(NOUN, states=states, topic=topic)) for phrase, (topic, states) in nouns.items())
    for name in schema.fields:
        yield from ((phrase, Term(WORD, options=((name, value),))) for phrase, value in _value_words(schema, name))


def _value_words(schema: Schema, name: str) -> Iterator[tuple[str, str]]:
    """The field's own words and its reading words, normalised: (phrase, value)."""
    own = schema.fields[name].words
    extra = schema.reading.words.get(name, {})
    for value in own:
        for word in (*own[value], *extra.get(value, ())):
            yield from ((normalize(p), value) for p in expand(word))


# ------------------------------------------------------------------------------ parsing


class ParsedAttributes(dict):
    """``parse``'s result: field -> value or None, with the evidence behind it.

    It compares equal to a plain dict, so ``parse(render(a)) == a`` reads naturally.
    """

    contradictions: dict[str, tuple[str, ...]]
    spans: dict[str, list[tuple[int, int]]]

    def __init__(self, values: dict, contradictions: dict, spans: dict | None = None):
        super().__init__(values)
        self.contradictions = contradictions  # field -> every value the text claimed
        self.spans = spans or {}  # with explain=True: field -> (start, end) of each place it was read

    @property
    def stated(self) -> list[str]:
        """Fields the text states without contradiction."""
        return [k for k, v in self.items() if v is not None]


def parse(text: str, schema: str | Schema = "wbcatt", explain: bool = False) -> ParsedAttributes:
    """Attributes stated in ``text``; None where it says nothing or contradicts itself. With
    ``explain``, ``.spans`` gives each field's character spans in ``text``."""
    return compiled_parser(schema).parse(text, explain)


_PARSERS: list["Parser"] = []  # the latest few, newest last
_KEEP_PARSERS = 8


def compiled_parser(schema: str | Schema) -> "Parser":
    """The parser for ``schema``, built on first use and kept (WBCAtt's: 1.1 s on a 2-core EPYC, 0.6 of it
    compiling the regex). Equal schemas share one: a model folder's embedded schema is built anew at
    each load, and training validates through a freshly loaded engine."""
    schema = get_schema(schema)
    for parser in reversed(_PARSERS):
        if parser.schema is schema or parser.schema == schema:
            return parser
    _PARSERS.append(Parser(schema))
    del _PARSERS[:-_KEEP_PARSERS]
    return _PARSERS[-1]


@dataclass(frozen=True)
class PhraseMatch:
    """A term read in a text, where it stands, and what it states there."""

    phrase: str  # normalised
    start: int  # first normalised token
    end: int  # one past the last normalised token
    char_start: int  # the span in the original text
    char_end: int
    assignment: Mapping[str, str]


class Parser:
    """The reader for one schema. Build once (``compiled_parser``), reuse for every caption."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.lexicon = build_lexicon(schema)
        subject = next((t for t in schema.reading.topics.values() if t.names), None)
        self.rules = Rules(schema.reading.implies, subject)
        # Phrases, punctuation and "cell" (what templates produce) read the same with no clause logic.
        self._plain = {p: t.states for p, t in self.lexicon.items() if t.kind == PHRASE or t.kind >= COLON
                       or (t.kind == NOUN and not t.states and t.topic is subject)}
        self.pattern = re.compile(r"(?<!\S)(?:" + _trie_regex(self.lexicon) + r")(?!\S)")

    def parse(self, text: str, explain: bool = False) -> ParsedAttributes:
        """The hot path (>= 20,000 template captions/s): one regex pass, then a few steps per term."""
        if explain:
            return _collect(self.schema, ((f, v, span) for f, v, span, _ in self.readings(text)), explain=True)
        phrases = self.pattern.findall(normalize(text))
        plain = [self._plain.get(phrase) for phrase in phrases]
        if None not in plain:  # template captions: phrases only
            return _collect_plain(self.schema, plain)
        return _collect(self.schema, read([(self.lexicon[phrase], None) for phrase in phrases], self.rules))

    def readings(self, text: str) -> list[tuple[str, str, tuple[int, int], str]]:
        """``(field, value, (char_start, char_end), phrase)`` for everything read in ``text``."""
        located = self._located_terms(text)
        return [(f, v, span, phrase) for f, v, (span, phrase) in read(located, self.rules)]

    def matches(self, text: str) -> list[PhraseMatch]:
        """Every term that states something, with its span: e.g. to find the tokens behind an attribute."""
        tokens = _normal_tokens(text)
        starts = {m.start(): i for i, (_, m) in enumerate(tokens)}
        grouped: dict[tuple[int, int], dict] = {}
        for field_, value, span, _ in self.readings(text):
            grouped.setdefault(span, {})[field_] = value
        found = []
        for (a, b), assignment in sorted(grouped.items()):
            first = starts[a]
            last = next(i for i in range(first, len(tokens)) if tokens[i][1].end() == b)
            phrase = " ".join(t for t, _ in tokens[first : last + 1])
            found.append(PhraseMatch(phrase, first, last + 1, a, b, assignment))
        return found

    def _located_terms(self, text: str) -> list[tuple[Term, tuple[tuple[int, int], str]]]:
        tokens = _normal_tokens(text)
        normal = " ".join(token for token, _ in tokens)
        located = []
        for m in self.pattern.finditer(normal):
            start = normal.count(" ", 0, m.start())
            end = start + m.group().count(" ") + 1
            located.append((self.lexicon[m.group()], ((tokens[start][1].start(), tokens[end - 1][1].end()), m.group())))
        return located


def _collect(schema: Schema, readings, explain: bool = False) -> ParsedAttributes:
    """Field -> value from ``(field, value, where)`` readings; two values for a field are a contradiction."""
    values, clashes, spans = dict.fromkeys(schema.field_names), {}, {}
    for field_, value, where in readings:
        if explain:
            spans.setdefault(field_, []).append(where)
        _settle(values, clashes, field_, value)
    return ParsedAttributes(values, {f: tuple(sorted(v)) for f, v in clashes.items()}, spans)


def _collect_plain(schema: Schema, plain: list) -> ParsedAttributes:
    """``_collect`` for the states of phrases alone: the template captions' hot path, no generators."""
    values, clashes = dict.fromkeys(schema.field_names), {}
    for states in plain:
        for field_, value in states:
            _settle(values, clashes, field_, value)
    return ParsedAttributes(values, {f: tuple(sorted(v)) for f, v in clashes.items()})


def _settle(values: dict, clashes: dict, field_: str, value: str) -> None:
    """Record ``field_ = value``; a second, different value makes the field a contradiction (None)."""
    first = values[field_]
    if first is None and field_ not in clashes:
        values[field_] = value
    elif first != value:
        clashes.setdefault(field_, {first} - {None}).add(value)
        values[field_] = None


# ------------------------------------------------------------------------------ reading clauses


@dataclass(frozen=True)
class Rules:
    """What reading needs from the schema besides the lexicon."""

    implies: Mapping[str, Mapping[str, Mapping[str, str]]]  # field -> value -> what a read word states with it
    subject: Topic | None  # what a sentence is about when it names nothing: the cell


def read(terms: list[tuple[Term, object]], rules: Rules) -> Iterator[tuple[str, str, object]]:
    """``(field, value, where)`` for each statement in a text's terms (``where`` rides along)."""
    sentence: list = []
    for item in [*terms, (Term(SENTENCE), None)]:
        sentence.append(item)
        if item[0].kind >= QUESTION:
            yield from _read_sentence(sentence, rules)
            sentence = []


def _read_sentence(sentence: list, rules: Rules) -> Iterator[tuple[str, str, object]]:
    """What a sentence states, clause by clause (the module docstring, step 3)."""
    sentence = _credible(sentence)
    if any(term.kind in (CONTRAST, EXCLUSION) for term, _ in sentence):
        sentence = _without_contrasts(sentence)
    before, waiting = None, []  # the previous clause's topics; adjectives waiting for their noun
    for clause, opened, end in _clauses(sentence):
        topics = [(i, t.topic) for i, (t, _) in enumerate(clause) if t.topic is not None]
        if topics:
            for earlier in waiting:  # "with a round, unsegmented nucleus": adjectives before the noun
                yield from _read_clause(earlier, [(AHEAD, t) for _, t in topics], rules)
            waiting, before = [], topics
            yield from _read_clause(clause, topics, rules)
        elif clause and opened in (COMMA, BREAK) and before:  # "Cytoplasm: pale blue, clear and smooth"
            yield from _read_clause(clause, [(None, t) for _, t in before], rules)
        elif clause:
            waiting.append(clause)
        if waiting and end != COMMA:  # no noun followed: they are about the previous clause's, or the cell
            for earlier in waiting:
                yield from _read_clause(earlier, [(None, t) for _, t in before] if before else None, rules)
            waiting = []


def _credible(sentence: list) -> list:
    """The sentence without its parts (between semicolons and dashes) in doubt ("can't be excluded")
    or about other things ("Other cells in the field ...", "It sits between two red cells")."""
    kept, part = [], []
    for item in sentence:
        part.append(item)
        if item[0].kind in (SEMICOLON, QUESTION, SENTENCE):
            first = next((term.topic for term, _ in part if term.topic is not None), None)
            if not any(term.kind == DOUBT for term, _ in part) and not (first is not None and first.other):
                kept += part
            part = []
    return kept


def _clauses(sentence: list) -> Iterator[tuple[list, int, int]]:
    """``(terms, the kind that opened it, the kind that ends it)`` per clause. A hedge ("possibly",
    "?") empties its clause and those joined to it by commas or "with"."""
    clause: list = []
    opened, hedging = SENTENCE, False
    for term, where in sentence:
        if term.kind < BREAK:
            clause.append((term, where))
            continue
        hedging = term.kind == QUESTION or any(t.kind == HEDGE for t, _ in clause) or \
            (hedging and opened in (COMMA, OPENER))
        yield ([] if hedging else clause), opened, term.kind
        clause, opened = [], term.kind


def _without_contrasts(sentence: list) -> list:
    """The sentence without what it contrasts with: from "unlike" up to the cell named after the next
    comma ("Unlike the lymphocyte, which ..., the monocyte shown here"), and from "rather than" to
    the end of its clause."""
    kept, skipping, comma = [], None, False
    for term, where in sentence:
        if term.kind in (CONTRAST, EXCLUSION):
            skipping, comma = term.kind, False
            continue
        if skipping == CONTRAST:
            comma = comma or term.kind == COMMA
            if not (comma and term.topic is not None and term.topic.names):
                continue
        elif skipping == EXCLUSION and (term.kind < SEMICOLON and term.kind != COLON):
            continue
        skipping = None
        kept.append((term, where))
    return kept


def _read_clause(clause: list, topics: list | None, rules: Rules) -> Iterator[tuple[str, str, object]]:
    """What one clause states; ``topics``: ``(position, topic)``, position None for a topic taken from
    another clause; ``topics`` None: the clause names nothing and is about the cell (``rules.subject``)."""
    lenient = topics is None
    topics = [(None, rules.subject)] if lenient and rules.subject else topics or []
    denied = _denied(clause, topics)
    for i, (term, where) in enumerate(clause):
        if i in denied:
            states = term.denial
        elif term.kind == NOUN or (term.kind == PHRASE and (term.topic or not topics
                                                            or _reads(term.states, i, topics, rules))):
            states = term.states
        elif term.kind == WORD:
            states = _reads(term.options, i, topics, rules)
        else:
            continue
        yield from ((f, v, where) for f, v in _with_implied(states, rules.implies))
    if None in denied:  # "Vacuoles: none" after a key the clause took from the one before
        yield from ((f, v, clause[0][1]) for _, t in topics[:1] for f, v in t.absent.items())


def _denied(clause: list, topics: list) -> set:
    """Indices of the terms a negation denies; ``None`` for a taken topic denied after its key."""
    denied: set = set()
    for i, (term, _) in enumerate(clause):
        if (term.kind == NEGATION or _is_denial(term)) and i + 1 < len(clause):
            denied |= _denied_after(clause, i + 1 if term.kind == NEGATION else i, first=term.kind == NEGATION)
        elif term.kind in (NEGATION, NEGATION_AFTER):  # after what it denies: "granules absent", "Vacuoles: no"
            named = next((j for j in range(i - 1, -1, -1) if clause[j][0].topic is not None), None)
            if named is not None or (topics and topics[0][0] is None):
                denied.add(named)
    return denied


def _is_denial(term: Term) -> bool:
    """A phrase that denies a topic itself ("no granules"): what follows it straight on is denied too."""
    return term.kind == PHRASE and term.topic is not None and bool(term.states) and \
        dict(term.states) == dict(term.topic.absent)


def _denied_after(clause: list, start: int, first: bool) -> set:
    """A negation denies the term after it (``first``), and what "or" joins to that ("no vacuoles or
    granules", "no toxic granulation or vacuoles")."""
    denied = {start} if first else set()
    j = start
    while j + 2 < len(clause) and clause[j + 1][0].kind == OR and clause[j + 2][0].topic is not None:
        denied.add(j + 2)
        j += 2
    return denied


def _with_implied(states: tuple[tuple[str, str], ...], implies: Mapping) -> tuple[tuple[str, str], ...]:
    """``states`` and what they imply (the schema's ``implies``) for fields they do not state themselves."""
    said = {f for f, _ in states}
    implied = [(f, v) for field_, value in states for f, v in implies.get(field_, {}).get(value, {}).items()
               if f not in said]
    return (*states, *implied) if implied else states


def _reads(options: tuple[tuple[str, str], ...], i: int, topics: list, rules: Rules) -> tuple[tuple[str, str], ...]:
    """What a word (or a phrase naming no topic) at ``i`` states: the options of the field its nearest
    topic can take. A word of one field that no topic in reach takes is read for the cell when its
    clause names no topic itself ("Lymphocyte: round nucleus, N:C high, agranular")."""
    fields = {f for f, _ in options}
    takers = [(abs(j - i) if j is not None else 0, j is not None and j < i, t) for j, t in topics
              if t.other or fields.intersection(t.fields)]
    if not takers and len(fields) == 1 and not any(j is not None for j, _ in topics) and rules.subject:
        takers = [(0, False, rules.subject)] if fields.intersection(rules.subject.fields) else []
    if takers:
        topic = min(takers, key=lambda taker: taker[:2])[2]
        if topic.other:
            return ()
        chosen = next(f for f in topic.fields if f in fields)
        return tuple((f, v) for f, v in options if f == chosen)
    if len(fields) == 1 and not topics:
        return options
    return ()


# ------------------------------------------------------------------------------ exact phrases


def phrase_table(schema: Schema) -> dict[str, dict[str, str]]:
    """Every normalised phrase the schema's clause forms can produce -> the values it states.

    Raises SchemaError if one phrase would state two different things.
    """
    table: dict[str, dict[str, str]] = {}
    conflicts = []
    for clause, forms in [*schema.clauses.items(), ("extra_forms", schema.extra_forms)]:
        for form in forms:
            for phrase, assignment in _expand_form(schema, form):
                previous = table.setdefault(phrase, assignment)
                if previous != assignment:
                    conflicts.append(f"{clause}: {phrase!r} states {assignment} and {previous}")
    if conflicts:
        raise SchemaError(f"schema {schema.name}: ambiguous phrases:\n  - " + "\n  - ".join(conflicts[:20]))
    return table


def _expand_form(schema: Schema, form: Form):
    options = []
    for slot in form.slots:
        allowed = form.when.get(slot, schema.fields[slot].words.keys())
        options.append([(v, w) for v in allowed for w in schema.fields[slot].words[v]])
    for combo in itertools.product(*options):
        words = {slot: word for slot, (_, word) in zip(form.slots, combo)}
        assignment = {slot: value for slot, (value, _) in zip(form.slots, combo)} | form.implied
        yield normalize(format_text(form.text, words)), assignment


@functools.lru_cache(maxsize=None)
def _escaped(char: str) -> str:
    return re.escape(char)


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
    if len(node) == 1:  # most of the ~90,000 nodes: one way on, no group (half of the trie's 0.4 s)
        ((ch, child),) = node.items()
        return _escaped(ch) + _node_regex(child) if ch else ""
    branches = [_escaped(ch) + _node_regex(child) for ch, child in sorted(node.items()) if ch]
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if "" in node:
        return "(?:" + body + ")?"
    return body
