"""Captions: render attributes as expert prose and paraphrase it (``parse``, which reads any
caption back, lives in ``hemcap.parsing`` and is re-exported here).

``render`` fills a schema template with canonical words; ``paraphrase`` picks a template,
clause forms and synonyms at random (seeded) and shuffles list order, so training sees varied
wording.
"""

from __future__ import annotations

import random
import re
from typing import Mapping

from hemcap.parsing import (ParsedAttributes, Parser, PhraseMatch, compiled_parser, normalize, normalize_tokens,
                            parse, phrase_table)
from hemcap.schema import Schema, format_text, get_schema, template_lists

__all__ = ["CaptionError", "render", "paraphrase", "caption_variants", "tidy",
           # reading captions back lives in hemcap.parsing; these names stay importable from here
           "ParsedAttributes", "Parser", "PhraseMatch", "compiled_parser", "normalize", "normalize_tokens", "parse",
           "phrase_table"]

_AN = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


class CaptionError(ValueError):
    """Attributes that cannot be rendered (missing field, unknown value)."""


def tidy(text: str) -> str:
    """Generated text as a person writes it: WordPiece decoding leaves "band - shaped", "n : c",
    "ratio ;" and a lower-case start. The engine reads attributes from this text, as metrics do: the
    parser takes a spaced " - " for a dash between clauses."""
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
