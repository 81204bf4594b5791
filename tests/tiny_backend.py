"""A third backend, written the way a newcomer adds one: this module plus one registry line.

``VisionEncoderDecoderModel`` (a ViT encoder, a BERT decoder with cross-attention) is neither
BLIP nor a chat model; hemcap trains, saves, reloads and captions it through the ``Backend``
protocol alone. Register it with ``register_backend("tiny", "tiny_backend:TinyBackend")`` (or a
line in ``hemcap.models.registry.BACKENDS``).
"""

from __future__ import annotations

from typing import Sequence

from hemcap.models.base import IGNORE_INDEX, BaseBackend, load_hf_model, model_device, token_logprobs
from hemcap.models.blip import train_wordpiece


class TinyBackend(BaseBackend):
    kind = "tiny"
    model_types = ("vision-encoder-decoder",)
    title = "ViT-BERT encoder-decoder"
    pipeline_tag = "image-to-text"
    vision_prefixes = ("encoder",)

    @classmethod
    def build_scratch(cls, cfg, captions: list[str]):
        from transformers import (BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig,
                                  ViTImageProcessor, VisionTextDualEncoderProcessor)

        tokenizer = train_wordpiece(captions, cfg.vocab_size)
        size = cfg.vision_config.get("image_size", 32)
        encoder = ViTConfig(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64)
        decoder = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, is_decoder=True, add_cross_attention=True)
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        config.decoder_start_token_id, config.pad_token_id = tokenizer.cls_token_id, tokenizer.pad_token_id
        config.eos_token_id = tokenizer.sep_token_id
        processor = VisionTextDualEncoderProcessor(ViTImageProcessor(size={"height": size, "width": size}), tokenizer)
        return VisionEncoderDecoderModel(config=config), processor

    @classmethod
    def load_model(cls, name_or_path, dtype=None, quantize=None, revision=None, trust_remote_code=False):
        from transformers import VisionEncoderDecoderModel

        return load_hf_model(VisionEncoderDecoderModel, name_or_path, dtype, quantize, revision, trust_remote_code)

    def collate(self, rows: Sequence[dict], train: bool) -> dict:
        batch = {"pixel_values": self.pixel_values(rows)}
        if train:  # "[CLS] caption [SEP]" without its [CLS]: the model shifts labels right behind it
            encoded = self.tokenizer([r["caption"] for r in rows], padding="longest", return_tensors="pt")
            ids, mask = encoded["input_ids"][:, 1:], encoded["attention_mask"][:, 1:]
            batch["labels"] = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return batch

    def generate_scored(self, rows: Sequence[dict], settings):
        pixel_values = self.pixel_values(rows).to(model_device(self.model))
        out = self.model.generate(pixel_values=pixel_values, max_new_tokens=settings.max_new_tokens,
                                  num_beams=settings.num_beams, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
        return out.sequences[:, 1:], token_logprobs(self.model, out, settings.num_beams)
