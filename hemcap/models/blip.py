"""BLIP: ``BlipForConditionalGeneration`` with its ``BlipProcessor``.

The caption is the decoder's whole text; it starts from ``bos_token_id`` as ``generate()`` does.
Captioning encodes images in chunks of ``vision_chunk`` and decodes the features of
``decode_chunk`` images at once, through ``blip_attention.fast_attention`` (same greedy ids as
transformers' eager code, faster on a CPU). ``init: scratch`` builds random weights and a
WordPiece tokenizer trained on the training captions.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from hemcap.models import stem
from hemcap.models.base import (
    IGNORE_INDEX, BaseBackend, Generated, ModelError, focal_cross_entropy, load_hf_model, model_device,
    token_logprobs)

if TYPE_CHECKING:
    from hemcap.config import ModelConfig

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class BlipBackend(BaseBackend):
    kind = "blip"
    model_types = ("blip",)
    title = "BLIP captioning model"
    pipeline_tag = "image-to-text"
    vision_prefixes = ("vision_model",)
    mixup = focal = 0.0  # model.mixup and model.focal, set by configure for training
    refiner = None  # hemcap.models.refiner's, when the folder has one (restore)

    @classmethod
    def build_scratch(cls, cfg: ModelConfig, captions: list[str]):
        from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

        tokenizer = train_wordpiece(captions, cfg.vocab_size)
        special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.cls_token_id,  # the decoder starts from [CLS], as the tokenizer does
                       sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
        # BlipVisionConfig's initializer_range of 1e-10 would start position and class embeddings at ~0.
        vision = {"initializer_range": 0.02, **cfg.vision_config}
        config = BlipConfig(vision_config=vision, text_config={**cfg.text_config, **special}, **cfg.config_overrides)
        size = config.vision_config.image_size
        processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                                  tokenizer=tokenizer)
        model = BlipForConditionalGeneration(config)
        if cfg.vision_stem == "conv":
            stem.attach(model, stem.spec_for(config.vision_config))
        return model, processor

    @classmethod
    def load_model(cls, name_or_path, dtype=None, quantize=None, revision=None, trust_remote_code=False):
        """The weights; a hemcap folder's convolutional stem (``ModelInfo.vision_stem``) rebuilt in place."""
        from transformers import BlipForConditionalGeneration

        spec = stem.saved_spec(name_or_path)
        with stem.quiet_transformers() if spec else contextlib.nullcontext():
            model = load_hf_model(BlipForConditionalGeneration, name_or_path, dtype, quantize, revision,
                                  trust_remote_code)
        if spec:
            stem.restore(model, name_or_path, spec)
        return model

    def configure(self, cfg: ModelConfig) -> None:
        from hemcap.models import heads

        self.check_special_tokens()
        self.model.text_decoder.label_smoothing = cfg.label_smoothing  # read at init; set it for loaded models too
        self.mixup, self.focal = cfg.mixup, cfg.focal
        self.info.vision_stem = stem.spec_of(self.model)
        if cfg.attribute_loss and heads.heads_of(self.model) is None:
            hidden = self.model.config.vision_config.hidden_size
            self.info.attribute_heads = heads.attach(self.model, hidden, self.schema, cfg.attribute_loss)
        super().configure(cfg)

    @functools.cached_property
    def schema(self):
        return self.info.schema_object()

    def save(self, out_dir):
        """Weights, processor and info as every backend saves them; the attribute heads and the refiner beside them."""
        from hemcap.models import heads, refiner

        with heads.detached(self.model) as attached:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            if attached is not None:
                heads.save(attached, out_dir)  # before the info, which is written last
            if self.refiner is not None:
                refiner.save(self.refiner, out_dir)
            return super().save(out_dir)

    def restore(self, folder) -> None:
        from hemcap.models import heads, refiner

        if self.info.attribute_heads:
            heads.restore(self.model, folder, self.info.attribute_heads)
        if self.info.refiner:
            self.refiner = refiner.restore(folder, self.info.refiner)

    def attribute_logprobs(self, rows: Sequence[dict]) -> dict:
        """The attribute heads' log-probabilities per field for ``rows`` (one vision pass, fp32)."""
        return self._heads_logprobs(self.encode_images(self.pixel_values(rows)))

    def _heads_logprobs(self, image_embeds) -> dict:
        from hemcap.models import heads

        logits = heads.heads_of(self.model).fp32_logits(image_embeds[:, 0])
        return {name: values.log_softmax(-1) for name, values in logits.items()}

    def training_loss(self, model, batch: dict):
        """The caption loss, plus ``attribute_loss`` times the attribute heads' on the [CLS] feature;
        under ``mixup``, that of blended image pairs."""
        labels = batch.pop("attribute_labels", None)
        if self.mixup and model.training:
            return self._mixed_loss(model, batch, labels)
        out = model(**batch)
        return self._caption_loss(out, batch["labels"]) + self._heads_loss(model, out.image_embeds, labels)

    def _mixed_loss(self, model, batch: dict, labels):
        """mixup (Zhang et al. 2018): image i blended with image j = perm(i) in shares lam and 1 - lam;
        its loss is lam times caption i's plus 1 - lam times caption j's (one vision pass, two decoder
        passes). Noisy labels, as WBCAtt's nucleus_shape may be, are what it was shown to resist."""
        import torch

        inner = getattr(model, "module", model)
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
        perm = torch.randperm(batch["pixel_values"].shape[0], device=batch["pixel_values"].device)
        pixels = lam * batch["pixel_values"] + (1 - lam) * batch["pixel_values"][perm]
        image = inner.vision_model(pixel_values=pixels).last_hidden_state
        loss = 0.0
        for share, rows in ((lam, slice(None)), (1 - lam, perm)):
            text = inner.text_decoder(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                                      encoder_hidden_states=image, labels=batch["labels"][rows], reduction="mean")
            mine = None if labels is None else labels[rows]
            loss = loss + share * (self._caption_loss(text, batch["labels"][rows]) + self._heads_loss(model, image, mine))
        return loss

    def _caption_loss(self, out, labels):
        """The decoder's own (mean cross-entropy of the next token), or its focal form under ``focal``."""
        if not self.focal:
            return out.loss
        logits = out.logits[:, :-1]
        return focal_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), self.focal)

    def _heads_loss(self, model, image_embeds, labels):
        from hemcap.models import heads

        if labels is None:
            return 0.0
        weight = self.info.attribute_heads["weight"]
        return weight * heads.heads_of(model).loss(image_embeds[:, 0], labels, self.focal)

    def check_special_tokens(self) -> None:
        """BLIP starts from bos_token_id, stops at sep_token_id and pads with pad_token_id: all must be the tokenizer's."""
        text, tok = self.model.config.text_config, self.tokenizer
        problems = []
        if text.pad_token_id != tok.pad_token_id:
            problems.append(f"pad_token_id {text.pad_token_id} != tokenizer pad {tok.pad_token!r} ({tok.pad_token_id})")
        if text.sep_token_id != tok.sep_token_id:
            problems.append(f"sep_token_id {text.sep_token_id} != tokenizer sep {tok.sep_token!r} ({tok.sep_token_id})")
        if text.bos_token_id is None or not 0 <= text.bos_token_id < text.vocab_size:
            problems.append(f"bos_token_id {text.bos_token_id} is not in the vocabulary (size {text.vocab_size})")
        if len(tok) > text.vocab_size:
            problems.append(f"tokenizer has {len(tok)} tokens but the decoder only {text.vocab_size}")
        if problems:
            raise ModelError("BLIP text config does not match its tokenizer: " + "; ".join(problems))

    def collate(self, rows: Sequence[dict], train: bool) -> dict:
        batch = {"pixel_values": self.pixel_values(rows)}
        if not train:
            return batch
        encoded = self.tokenizer([r["caption"] for r in rows], padding="longest", truncation=True,
                                 max_length=self.info.max_length, return_tensors="pt")
        input_ids = encoded["input_ids"]
        input_ids[:, 0] = self.model.config.text_config.bos_token_id  # generate() starts from it too
        batch.update(input_ids=input_ids, attention_mask=encoded["attention_mask"],
                     labels=input_ids.masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX))
        if self.info.attribute_heads:
            from hemcap.models import heads

            batch["attribute_labels"] = heads.labels(rows, self.schema)
        return batch

    def generate_scored(self, rows: Sequence[dict], settings):
        features = self.encode_images(self.pixel_values(rows), settings.vision_chunk)
        ids, logprobs = self.decode(features, settings.max_new_tokens, settings.num_beams, settings.min_new_tokens)
        return Generated(ids, logprobs, self._heads_logprobs(features) if self.refiner is not None else None)

    def vision_chunk(self) -> int:
        """Images per vision-tower call: on a CPU, as many as keep one layer's activations within 4 MiB.

        That gives 2 at BLIP-base (577 tokens x 768, 1.8 MiB per image; batches of 8 ran 30 %
        slower per image) and 32 at the small 128 px model (65 x 256), as fast as 16 there
        (eval/bench_captioning.py). On a GPU, one large batch.
        """
        vision = self.model.config.vision_config
        if model_device(self.model).type != "cpu":
            return 64
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        per_image = tokens * vision.hidden_size * 4
        return max(1, min(64, 2 ** int(math.log2(max(1, (4 << 20) // per_image)))))

    def encode_images(self, pixel_values, chunk: int | None = None):
        """Vision features, ``chunk`` images per vision-tower call."""
        import torch

        from hemcap.models.blip_attention import fast_attention

        device, chunk = model_device(self.model), chunk or self.vision_chunk()
        with fast_attention(self.model):
            parts = [self.model.vision_model(pixel_values=pixel_values[i : i + chunk].to(device))[0]
                     for i in range(0, len(pixel_values), chunk)]
        return torch.cat(parts)

    def decode(self, image_embeds, max_new_tokens: int, num_beams: int = 1, min_new_tokens: int = 0):
        """(new token ids, their log-probabilities) for encoded images, decoded as BLIP's generate does."""
        import torch

        from hemcap.models.blip_attention import fast_attention

        text = self.model.config.text_config
        bos = torch.full((len(image_embeds), 1), text.bos_token_id, dtype=torch.long, device=image_embeds.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        with fast_attention(self.model):
            out = self.model.text_decoder.generate(
                input_ids=bos, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=False,
                output_scores=True, return_dict_in_generate=True)
        return out.sequences[:, 1:], token_logprobs(self.model.text_decoder, out, num_beams)


def train_wordpiece(texts: Sequence[str], vocab_size: int):
    """A lower-case BERT WordPiece tokenizer for ``texts`` ([PAD]=0, [UNK], [CLS], [SEP], [MASK]).

    The vocabulary is every character (alone and as a ``##`` continuation), then whole words by
    frequency up to ``vocab_size``: a caption vocabulary is a few hundred words, so captions stay
    short. Built by counting rather than with ``tokenizers``' WordPieceTrainer, which breaks ties
    differently from run to run, so the same captions always give the same token ids.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = BERT_SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    known = set(vocab)
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if w not in known]
    vocab += words[: max(0, vocab_size - len(vocab))]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
