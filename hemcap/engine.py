"""Batched captioning with per-token probabilities and per-attribute confidences.

Used by ``hemcap caption``, ``hemcap eval``, validation during training, the smear pipeline and
the demo: one decoding path, so a validation figure is the figure ``hemcap eval`` reports. Rows go
to the backend's ``generate_scored`` ``decode_chunk`` at a time; the backend decides how (BLIP
encodes images in chunks of ``vision_chunk`` and decodes their features together, through
``hemcap.models.blip_attention``). Greedy decoding by default; beam search with ``num_beams``.

Each caption keeps the probability of every generated token. An attribute's confidence is the
lowest probability among the tokens of the phrase that stated it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from hemcap.captions import compiled_parser, tidy
from hemcap.domain import Domain, normalise_stain
from hemcap.images import model_pixels, model_sized
from hemcap.models import Generated
from hemcap.schema import Schema, get_schema

log = logging.getLogger(__name__)


@dataclass
class Caption:
    """One generated caption with what it says and how sure the model was."""

    text: str
    token_ids: list[int]
    token_probs: list[float]
    attributes: dict[str, str | None]
    confidences: dict[str, float | None]
    contradictions: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"caption": self.text, "attributes": self.attributes, "confidences": self.confidences,
                "contradictions": {k: list(v) for k, v in self.contradictions.items()}}


@dataclass
class EngineSettings:
    """How captions are generated."""

    max_new_tokens: int = 60  # a full WBCAtt caption is about 40 WordPiece tokens
    min_new_tokens: int = 0  # force at least this many tokens (benchmarks compare equal work)
    num_beams: int = 1  # 1: greedy
    vision_chunk: int | None = None  # images per vision-tower call; None: the backend's choice (small on a CPU)
    decode_chunk: int = 128  # encoded images decoded together; decoding is memory-bound at batch 1
    tta_views: int = 1  # 1, 2, 4 or 8 rotations/flips captioned per image, attributes voted (cells have no orientation)
    device: str | None = None  # "cpu", "cuda", "cuda:1", ...; None: the first GPU if there is one, else the CPU
    stain_norm: bool = True  # give each image the training images' colours, as the model's info says (hemcap.domain)

    def __post_init__(self):
        problems = [f"{name} must be >= 1 (got {getattr(self, name)})"
                    for name in ("max_new_tokens", "num_beams", "vision_chunk", "decode_chunk")
                    if getattr(self, name) is not None and getattr(self, name) < 1]
        if self.tta_views not in (1, 2, 4, 8):
            problems.append(f"tta_views must be 1, 2, 4 or 8 (got {self.tta_views})")
        problems += _device_problems(self.device)
        if problems:
            raise ValueError("; ".join(problems))


def _device_problems(device: str | None) -> list[str]:
    if device is None:
        return []
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        return [f"device {device!r} is not a torch device (try cpu or cuda)"]
    if kind == "cuda" and not torch.cuda.is_available():
        return [f"device {device!r} asks for CUDA, which this machine does not have"]
    return []


def engine_device(device: str | None = None):
    """``device``, or the first CUDA GPU when there is one, else the CPU."""
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode for the block, then back as it was (validation runs mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def dihedral(image, k: int):
    """View ``k`` of 8: rotation by k % 4 quarter turns, transposed when k >= 4. PIL image or CHW tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        turned = image.rotate(90 * (k % 4), expand=True) if k % 4 else image
        return turned.transpose(Image.Transpose.TRANSPOSE) if k >= 4 else turned
    import torch

    turned = torch.rot90(image, k % 4, dims=(-2, -1))
    return turned.transpose(-2, -1) if k >= 4 else turned


class CaptionEngine:
    """A loaded captioner: images in, ``Caption``s out. Load once, call many times."""

    def __init__(self, backend, schema: str | Schema | None = None, settings: EngineSettings | None = None):
        self.backend = backend
        self.schema = get_schema(schema) if schema is not None else backend.info.schema_object()
        self.settings = settings or EngineSettings()
        self.parser = compiled_parser(self.schema)
        self.domain = Domain.from_info(backend.info)  # None: trained before hemcap recorded it
        if not getattr(backend.model, "hf_device_map", None):  # models placed by accelerate stay where they are
            backend.model.to(engine_device(self.settings.device))

    @classmethod
    def from_dir(cls, model_dir: str | Path, schema: str | Schema | None = None, **settings) -> "CaptionEngine":
        """Load a model folder (full model or LoRA adapter). It speaks the schema its info embeds and
        decodes as its validation did; ``settings`` override those decoding settings."""
        from hemcap.models import load_trained

        backend = load_trained(model_dir)
        return cls(backend, schema, EngineSettings(**{**backend.info.decoding, **settings}))

    def caption(self, images: Sequence) -> list[Caption]:
        """Captions for PIL images (any size: the processor resizes them)."""
        return self.caption_rows([{"image": image} for image in images])

    def caption_rows(self, rows: Sequence[dict]) -> list[Caption]:
        """Captions for rows holding ``image`` (PIL) or ``pixels`` (preprocessed tensors)."""
        import torch

        if not rows:
            return []
        seen = rows = self.model_rows(rows)
        views = self.settings.tta_views
        if views > 1:
            rows = [{key: dihedral(value, k) for key, value in row.items() if key in ("image", "pixels")}
                    for row in seen for k in range(views)]
        with torch.inference_mode(), _eval_mode(self.backend.model):
            ids, logprobs, heads = self._generate(rows)
            captions = [self._caption(row_ids, row_logprobs) for row_ids, row_logprobs in zip(ids, logprobs)]
            if views > 1:
                captions = [self._vote(captions[i : i + views]) for i in range(0, len(captions), views)]
            if getattr(self.backend, "refiner", None) is not None:  # after voting: the refiner reads view 0
                heads = {name: values[::views] for name, values in heads.items()} if heads else None
                captions = self._refined(captions, seen, heads)
        return captions

    def model_rows(self, rows: Sequence[dict]) -> list[dict]:
        """``rows`` as the model is given them: with stain normalisation, each image as ``pixels``
        cropped, resized and normalised here (the backend would crop an ``image`` a second time)."""
        import torch

        if not self.normalises_stain:
            return list(rows)
        return [{"pixels": torch.from_numpy(model_pixels(self.normalised(row["image"]), self.backend.image_size)) / 255}
                if "image" in row else row for row in rows]

    @property
    def normalises_stain(self) -> bool:
        return self.settings.stain_norm and self.domain is not None and self.domain.normalises

    def seen(self, image):
        """What the model is given of ``image``: its centre crop (``ModelInfo.centre_crop``) at the input size."""
        return model_sized(image, self.backend.image_size, self.backend.info.centre_crop)

    def normalised(self, image):
        """``image`` as the model sees it, in the training images' colours (``hemcap.domain``)."""
        return normalise_stain(self.seen(image), self.domain)

    def _vote(self, views: list[Caption]) -> Caption:
        """One caption from several views: each field takes the value with the most summed confidence.

        When every field has a value, the caption is the schema's canonical sentence for the voted
        attributes; otherwise the view that agrees with the vote most is kept as it was generated.
        """
        from hemcap.captions import render

        attributes, confidences = {}, {}
        for name in self.schema.field_names:
            weight: dict[str, float] = {}
            for view in views:
                if view.attributes[name] is not None:
                    weight[view.attributes[name]] = weight.get(view.attributes[name], 0.0) + (view.confidences[name] or 0.0)
            best = max(weight, key=weight.get) if weight else None
            attributes[name] = best
            confidences[name] = weight[best] / len(views) if best is not None else None
        agreeing = max(views, key=lambda v: sum(v.attributes[n] == attributes[n] for n in attributes))
        if all(v is not None for v in attributes.values()):
            text = render(attributes, self.schema)
        else:
            text = agreeing.text
        return Caption(text, agreeing.token_ids, agreeing.token_probs, attributes, confidences, {})

    def _refined(self, captions: list[Caption], rows: Sequence[dict], heads: dict | None = None) -> list[Caption]:
        """Each refined field takes the refiner's value (``hemcap.models.refiner``) and the caption becomes
        the schema's sentence for the result, as under voting; one that leaves another field unstated
        stays as generated (no sentence can say it). ``heads``: the rows' heads' log-probabilities from
        the captioning pass (``Generated.heads``); None: the refiner encodes the rows again."""
        from hemcap.captions import render
        from hemcap.refine import refined

        for caption, values in zip(captions, refined(self.backend, rows, heads)):
            attributes = {**caption.attributes, **{name: value for name, (value, _) in values.items()}}
            if any(value is None for value in attributes.values()):
                continue
            caption.attributes, caption.text, caption.contradictions = attributes, render(attributes, self.schema), {}
            caption.confidences.update({name: probability for name, (_, probability) in values.items()})
        return captions

    def _generate(self, rows: Sequence[dict]) -> tuple[list[list[int]], list[list[float]], dict | None]:
        """Per row, the new tokens and their log-probs; the heads' log-probabilities per field when the
        backend gave them (``Generated.heads``), else None."""
        import torch

        ids, logprobs, heads = [], [], []
        for start in range(0, len(rows), self.settings.decode_chunk):
            generated = Generated(*self.backend.generate_scored(rows[start : start + self.settings.decode_chunk],
                                                                self.settings))
            self._extend(ids, logprobs, generated)
            heads.append(generated.heads)
        if any(part is None for part in heads):
            return ids, logprobs, None
        return ids, logprobs, {name: torch.cat([part[name] for part in heads]) for name in heads[0]}

    def _extend(self, ids: list, logprobs: list, generated) -> None:
        """Keep each row's new tokens up to (not including) its end token, with their log-probs."""
        sequences, scores = generated.ids, generated.logprobs
        stop = self.backend.stop_token_ids
        for row_ids, row_scores in zip(sequences.tolist(), scores.tolist()):
            end = next((i for i, t in enumerate(row_ids) if t in stop), len(row_ids))
            ids.append(row_ids[:end])
            logprobs.append(row_scores[:end])

    def _caption(self, token_ids: list[int], logprobs: list[float]) -> Caption:
        import math

        probs = [math.exp(lp) for lp in logprobs]
        text, spans = self._decode_with_spans(token_ids)
        parsed = self.parser.parse(text, explain=True)  # one reading gives the values and where each was read
        confidences = dict.fromkeys(self.schema.field_names)
        for name, places in parsed.spans.items():
            lows = [min((p for p, (a, b) in zip(probs, spans) if a < end and b > start), default=None)
                    for start, end in places]
            lows = [low for low in lows if low is not None]
            if parsed[name] is not None and lows:
                confidences[name] = min(lows)
        return Caption(text, token_ids, probs, dict(parsed), confidences, parsed.contradictions)

    def _decode_with_spans(self, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """The tidied text (what metrics and people read) and each token's character span in it,
        from the tidied decoded prefixes. WordPiece decoding writes "band - shaped", which a reader
        takes as a dash (a schema without hyphen-aware readings then misses the nucleus); a prefix
        that ends inside such a word is a character longer than its place in the whole text."""
        prefixes = [tidy(p) for p in self._decode_all([token_ids[: k + 1] for k in range(len(token_ids))])]
        text = prefixes[-1] if prefixes else ""
        ends = list(itertools.accumulate((min(len(p), len(text)) for p in prefixes), max))
        return text, [(start, end) for start, end in zip([0, *ends[:-1]], ends)]

    def _decode_all(self, sequences: list[list[int]]) -> list[str]:
        """``tokenizer.batch_decode(skip_special_tokens=True)``, through the Rust backend in one call when
        there is one: the per-string Python wrapper was half the engine's post-processing time."""
        tokenizer = self.backend.tokenizer
        rust = getattr(tokenizer, "backend_tokenizer", None)
        if rust is None:
            return tokenizer.batch_decode(sequences, skip_special_tokens=True)
        texts = rust.decode_batch(sequences, skip_special_tokens=True)
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            texts = [tokenizer.clean_up_tokenization(text) for text in texts]
        return texts
