"""Attribute schemas: loading and checking the declarative YAML files in ``data_recipes/``.

A schema says which fields a caption states (morphological attributes plus label fields such
as the cell type), which values each field takes, the words that express each value, how words
combine into clauses, the caption templates, and how free text is read (``reading``: topic nouns,
value words, negations; see ``hemcap.parsing``). Templates, parser, metrics and demo all read
from it; nothing else in hemcap knows an attribute vocabulary.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import yaml

_SLOT = re.compile(r"\{(\w+)\}")
_LIST = re.compile(r"\[([^\]]+)\]")


class SchemaError(ValueError):
    """A schema file is malformed; the message lists every problem found."""


@dataclass(frozen=True)
class Field:
    """One thing a caption states, e.g. ``nucleus_shape``."""

    name: str
    column: str
    description: str
    words: Mapping[str, tuple[str, ...]]  # value -> words; the first is canonical
    aliases: tuple[str, ...] = ()  # other names for the field in annotation files

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self.words)


@dataclass(frozen=True)
class Form:
    """One way to say a clause: text with {field} slots, limited to some values by ``when``."""

    text: str
    slots: tuple[str, ...]
    when: Mapping[str, frozenset[str]]
    fallback: bool = False  # used only when no other form of the clause can say the values

    def allows(self, attributes: Mapping[str, str]) -> bool:
        return all(attributes[name] in allowed for name, allowed in self.when.items())

    @property
    def implied(self) -> dict[str, str]:
        """Fields named in ``when`` but not slotted: stating the form states them."""
        return {name: next(iter(v)) for name, v in self.when.items() if name not in self.slots}


@dataclass(frozen=True)
class Topic:
    """Something a clause can be about ("the nucleus"), named by its nouns."""

    name: str
    fields: tuple[str, ...]  # what a clause about it can state, the likelier reading of a word first
    nouns: tuple[str, ...]
    names: str | None = None  # a field whose words are nouns of this topic too (the cell type)
    present: Mapping[str, str] = field(default_factory=dict)  # what mentioning it states ("vacuoles")
    absent: Mapping[str, str] = field(default_factory=dict)  # what denying it states ("no vacuoles")

    @property
    def other(self) -> bool:
        """A topic of no field (red cells, platelets): words about it are not about the cell."""
        return not self.fields


@dataclass(frozen=True)
class Reading:
    """How free text is read beyond the clause forms' exact phrases (``hemcap.parsing``)."""

    topics: Mapping[str, Topic] = field(default_factory=dict)
    words: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)  # field -> value -> words
    implies: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)  # field -> value -> others
    negations: tuple[str, ...] = ()  # before what they deny: "no", "without"
    negations_after: tuple[str, ...] = ()  # after it: "absent", "not seen"
    breaks: tuple[str, ...] = ()  # words that end a clause as a comma does: "and", "but"
    openers: tuple[str, ...] = ()  # words that end a clause and open a noun phrase: "with"
    alternatives: tuple[str, ...] = ()  # what joins denied things: "no vacuoles or granules"
    ignore: tuple[str, ...] = ()  # phrases read as nothing, so no word inside them is: "toxic granulation"
    hedges: tuple[str, ...] = ()  # a clause holding one states nothing: "possibly", "may be"
    doubts: tuple[str, ...] = ()  # a sentence holding one states nothing: "cannot be excluded", "if"
    contrasts: tuple[str, ...] = ()  # what follows, up to the next cell named, is another cell: "unlike"
    exclusions: tuple[str, ...] = ()  # the rest of the clause is what the cell is not: "rather than"


@dataclass(frozen=True)
class Schema:
    """A loaded, checked attribute schema."""

    name: str
    description: str
    fields: Mapping[str, Field]
    targets: tuple[str, ...]
    clauses: Mapping[str, tuple[Form, ...]]
    templates: tuple[tuple[str, ...], ...]
    extra_forms: tuple[Form, ...] = ()  # phrasings the parser accepts that templates never use
    reading: Reading = field(default_factory=Reading)  # how free text is read beyond exact phrases
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)  # the YAML as parsed: what models embed

    @property
    def field_names(self) -> tuple[str, ...]:
        """All fields, attributes first, in file order: the keys `parse` returns."""
        return self.attribute_names + self.targets

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The morphological attributes (every field that is not a target)."""
        return tuple(n for n in self.fields if n not in self.targets)

    @property
    def cell_type_field(self) -> str:
        return self.targets[0]

    def values(self, field: str) -> tuple[str, ...]:
        return self.fields[field].values

    def check_attributes(self, attributes: Mapping[str, object], where: str = "") -> list[str]:
        """Problems with one row of attributes (missing fields, unknown values), as messages."""
        prefix = f"{where}: " if where else ""
        problems = []
        for name, field in self.fields.items():
            value = attributes.get(name)
            if value is None:
                problems.append(f"{prefix}missing field {name!r}")
            elif value not in field.words:
                problems.append(
                    f"{prefix}{name}={value!r} is not a {self.name} value "
                    f"(expected one of {', '.join(field.values)})"
                )
        return problems


def schema_dir() -> Path:
    """Where the shipped schema files live (``data_recipes/`` in the source tree)."""
    return Path(str(resources.files("hemcap.data_recipes")))


def available_schemas() -> list[str]:
    return sorted(p.stem for p in schema_dir().glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def load_schema(name_or_path: str | Path) -> Schema:
    """Load a shipped schema by name (``"wbcatt"``) or any schema YAML by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = schema_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise SchemaError(
                f"unknown schema {name_or_path!r}; shipped schemas: {', '.join(available_schemas())}"
            )
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return build_schema(raw, source=str(path))


def get_schema(schema: str | Path | Schema) -> Schema:
    return schema if isinstance(schema, Schema) else load_schema(schema)


def build_schema(raw: dict, source: str = "<dict>") -> Schema:
    """Build and check a schema from its parsed YAML; raise SchemaError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SchemaError(f"{source}: expected a mapping at the top level")
    for key in ("name", "fields", "clauses", "templates"):
        if key not in raw:
            problems.append(f"missing top-level key {key!r}")
    if problems:
        raise SchemaError(f"{source}: " + "; ".join(problems))
    fields = _build_fields(raw["fields"], problems)
    targets = tuple(raw.get("targets") or ("cell_type",))
    problems += [f"targets: unknown field {t!r}" for t in targets if t not in fields]
    clauses = _build_clauses(raw["clauses"], fields, problems)
    templates = _build_templates(raw["templates"], clauses, fields, problems)
    extra = tuple(_build_form(f, "extra_forms", fields, problems) for f in raw.get("extra_forms") or [])
    reading = _build_reading(raw.get("reading") or {}, fields, problems)
    if problems:
        raise SchemaError(f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return Schema(
        name=str(raw["name"]),
        description=str(raw.get("description", "")).strip(),
        fields=MappingProxyType(fields),
        targets=targets,
        clauses=MappingProxyType(clauses),
        templates=templates,
        extra_forms=extra,
        reading=reading,
        raw=MappingProxyType(raw),
    )


def _build_fields(raw: dict, problems: list[str]) -> dict[str, Field]:
    fields = {}
    for name, spec in (raw or {}).items():
        values = (spec or {}).get("values") or {}
        if not values:
            problems.append(f"fields.{name}: no values")
        words = {}
        for value, value_words in values.items():
            value_words = [value_words] if isinstance(value_words, str) else list(value_words or [])
            if not value_words:
                problems.append(f"fields.{name}.{value}: no words")
            words[str(value)] = tuple(str(w) for w in value_words)
        aliases = tuple(spec.get("aliases") or ())
        fields[name] = Field(name, spec.get("column", name), spec.get("description", ""), words, aliases)
    return fields


READING_LISTS = ("negations", "negations_after", "breaks", "openers", "alternatives", "ignore", "hedges", "doubts",
                 "contrasts", "exclusions")


def _build_reading(raw: dict, fields: dict[str, Field], problems: list[str]) -> Reading:
    topics = {name: _build_topic(name, spec or {}, fields, problems)
              for name, spec in (raw.get("topics") or {}).items()}
    lists = {key: _strings(raw.get(key)) for key in READING_LISTS}
    problems += [f"reading.{key}: {entry!r} is not text (quote yes, no, on and off in YAML)"
                 for key in lists for entry in raw.get(key) or () if not isinstance(entry, str)]
    return Reading(MappingProxyType(topics), MappingProxyType(_reading_words(raw, fields, problems)),
                   MappingProxyType(_reading_implies(raw, fields, problems)), **lists)


def _reading_words(raw: dict, fields: dict[str, Field], problems: list[str]) -> dict:
    words = {}
    for name, values in (raw.get("words") or {}).items():
        words[name] = {str(v): _strings(w) for v, w in (values or {}).items()}
        problems += _unknown_values(f"reading.words.{name}", {name: list(words[name])}, fields)
    return words


def _reading_implies(raw: dict, fields: dict[str, Field], problems: list[str]) -> dict:
    implies = {}
    for name, values in (raw.get("implies") or {}).items():
        implies[name] = {str(v): {k: str(x) for k, x in (others or {}).items()} for v, others in (values or {}).items()}
        problems += _unknown_values(f"reading.implies.{name}", {name: list(implies[name])}, fields)
        for others in implies[name].values():
            problems += _unknown_values(f"reading.implies.{name}", {k: [v] for k, v in others.items()}, fields)
    return implies


def _build_topic(name: str, spec: dict, fields: dict[str, Field], problems: list[str]) -> Topic:
    where = f"reading.topics.{name}"
    topic_fields = _strings(spec.get("fields"))
    present = {k: str(v) for k, v in (spec.get("present") or {}).items()}
    absent = {k: str(v) for k, v in (spec.get("absent") or {}).items()}
    problems += [f"{where}: unknown field {f!r}" for f in topic_fields if f not in fields]
    problems += _unknown_values(f"{where}.present", {k: [v] for k, v in present.items()}, fields)
    problems += _unknown_values(f"{where}.absent", {k: [v] for k, v in absent.items()}, fields)
    names = spec.get("names")
    if names is not None and names not in fields:
        problems.append(f"{where}: names unknown field {names!r}")
    if not _strings(spec.get("nouns")) and names is None:
        problems.append(f"{where}: no nouns")
    return Topic(name, topic_fields, _strings(spec.get("nouns")), names, MappingProxyType(present),
                 MappingProxyType(absent))


def _unknown_values(where: str, values: Mapping[str, list[str]], fields: dict[str, Field]) -> list[str]:
    """Problems for field names or values a ``reading`` entry names that the schema does not have."""
    problems = []
    for name, listed in values.items():
        if name not in fields:
            problems.append(f"{where}: unknown field {name!r}")
            continue
        problems += [f"{where}: {v!r} is not a value of {name}" for v in listed if v not in fields[name].words]
    return problems


def _strings(raw) -> tuple[str, ...]:
    return tuple(str(w) for w in ([raw] if isinstance(raw, str) else raw or ()))


def _build_clauses(raw: dict, fields: dict[str, Field], problems: list[str]) -> dict:
    clauses = {}
    for name, forms in (raw or {}).items():
        built = tuple(_build_form(f, f"clauses.{name}", fields, problems) for f in forms or [])
        if not built:
            problems.append(f"clauses.{name}: no forms")
        clauses[name] = built
        _check_clause_covers_all_values(name, built, fields, problems)
    return clauses


def _build_form(raw, where: str, fields: dict[str, Field], problems: list[str]) -> Form:
    raw = {"text": raw} if isinstance(raw, str) else dict(raw)
    text = str(raw.get("text", ""))
    slots = tuple(_SLOT.findall(text))
    problems += [f"{where}: {text!r} names unknown field {s!r}" for s in slots if s not in fields]
    when = {}
    for name, allowed in (raw.get("when") or {}).items():
        allowed = frozenset([allowed] if isinstance(allowed, str) else map(str, allowed))
        if name not in fields:
            problems.append(f"{where}: when names unknown field {name!r}")
            continue
        unknown = sorted(allowed - set(fields[name].words))
        problems += [f"{where}: when {name}={v!r} is not a value of {name}" for v in unknown]
        when[name] = allowed
    form = Form(text, slots, MappingProxyType(when), bool(raw.get("fallback", False)))
    for name, allowed in when.items():
        if name not in slots and len(allowed) != 1:
            problems.append(f"{where}: {text!r} implies {name} but allows {len(allowed)} values")
    return form


def _check_clause_covers_all_values(name, forms, fields, problems) -> None:
    """Every combination of the clause's fields must have a form, or render would fail."""
    names = sorted({n for f in forms for n in (*f.slots, *f.when) if n in fields})
    for combo in itertools.product(*(fields[n].values for n in names)):
        attributes = dict(zip(names, combo))
        if not any(f.allows(attributes) for f in forms):
            problems.append(f"clauses.{name}: no form can say {attributes}")
            return


def _build_templates(raw, clauses, fields, problems) -> tuple[tuple[str, ...], ...]:
    templates = tuple(tuple(str(s) for s in frame) for frame in raw or [])
    if not templates:
        problems.append("templates: none")
    for i, frame in enumerate(templates):
        used = [c for sentence in frame for c in _SLOT.findall(sentence)]
        problems += [f"templates[{i}]: unknown clause {c!r}" for c in used if c not in clauses]
        stated = {n for c in used if c in clauses for f in clauses[c] for n in (*f.slots, *f.when)}
        missing = [n for n in fields if n not in stated]
        if missing:
            problems.append(f"templates[{i}] never states {', '.join(missing)}")
    return templates


def template_slots(sentence: str) -> list[str]:
    """Clause names in a template sentence, in order."""
    return _SLOT.findall(sentence)


def template_lists(sentence: str) -> list[re.Match]:
    """The ``[a, b, c]`` list groups of a template sentence."""
    return list(_LIST.finditer(sentence))


def format_text(text: str, words: Mapping[str, str]) -> str:
    """Fill {slot}s with words; unlike str.format, leaves other braces alone."""
    return _SLOT.sub(lambda m: words[m.group(1)], text)

