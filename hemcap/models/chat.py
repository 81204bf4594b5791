"""Chat models: an image-text-to-text model (MedGemma / Gemma 3 class) through
``AutoModelForImageTextToText`` and ``AutoProcessor``.

The caption is the assistant's turn after a system prompt and a user turn holding the image;
only the assistant's tokens carry loss. ``init: scratch`` builds a tiny Gemma 3 with random
weights and a byte-level BPE tokenizer trained on the captions (tests, CPU checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from hemcap.models.base import IGNORE_INDEX, BaseBackend, Generated, ModelError, model_device, token_logprobs

if TYPE_CHECKING:
    from hemcap.config import ModelConfig

CHAT_SPECIAL_TOKENS = {  # Gemma 3's names, so the processor finds them
    "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
    "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
}
CHAT_TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
# Gemma 3's chat format: the system prompt opens the first user turn; the model's turn is "model".
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'][0]['text'] + '\n\n' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' -}}"
    "{%- if message['role'] == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
# init=scratch defaults for a chat model: a few layers, enough for tests on a CPU.
CHAT_SCRATCH_VISION = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=2,
                           vision_use_head=False)  # Gemma 3 reads the patch tokens; the pooling head is unused
CHAT_SCRATCH_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, sliding_window=64, max_position_embeddings=512)


class ChatBackend(BaseBackend):
    kind = "chat"
    model_types = ("*",)  # any image-text-to-text model that is not BLIP
    title = "vision-language chat model"
    pipeline_tag = "image-text-to-text"
    vision_prefixes = ("model.vision_tower", "vision_tower", "model.visual", "visual")

    @classmethod
    def build_scratch(cls, cfg: ModelConfig, captions: list[str]):
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

        tokenizer = train_chat_tokenizer(captions + [cfg.prompt, cfg.system_prompt], cfg.vocab_size)
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in CHAT_SPECIAL_TOKENS.items()}
        text = {**CHAT_SCRATCH_TEXT, **cfg.text_config, "vocab_size": len(tokenizer),
                "pad_token_id": ids["pad_token"], "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"]}
        vision = {"model_type": "siglip_vision_model", **CHAT_SCRATCH_VISION, **cfg.vision_config}
        overrides = {"mm_tokens_per_image": 4, **cfg.config_overrides}
        config = Gemma3Config(text_config=text, vision_config=vision, boi_token_index=ids["boi_token"],
                              eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"], **overrides)
        model = Gemma3ForConditionalGeneration(config)
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        model.generation_config.eos_token_id = [ids["eos_token"], end_of_turn]  # as Gemma 3 stops
        model.generation_config.pad_token_id = ids["pad_token"]
        size = config.vision_config.image_size
        processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": size, "width": size}),
                                    tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                    image_seq_length=config.mm_tokens_per_image)
        return model, processor

    def messages(self, answer: str | None = None) -> list[dict]:
        messages = []
        if self.info.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.info.system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.info.prompt}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def _render(self, answer: str | None = None) -> str:
        return self.processor.apply_chat_template(self.messages(answer), tokenize=False,
                                                  add_generation_prompt=answer is None)

    def _encode(self, texts: list[str], rows: Sequence[dict], padding_side: str) -> dict:
        images, options = self.image_kwargs(rows)
        return dict(self.processor(text=texts, images=[[im] for im in images], padding=True,
                                   padding_side=padding_side, return_tensors="pt", **options))

    def collate(self, rows: Sequence[dict], train: bool) -> dict:
        if not train:
            return self._encode([self._render()] * len(rows), rows, padding_side="left")
        batch = self._encode([self._render(r["caption"]) for r in rows], rows, padding_side="right")
        batch["labels"] = self._assistant_labels(batch, rows)
        return batch

    def _assistant_labels(self, batch: dict, rows: Sequence[dict]):
        """Labels with the prompt (system, user, image) and the padding masked: loss on the answer only."""
        prompt_ids = self._encode([self._render()], rows[:1], padding_side="right")["input_ids"][0]
        input_ids = batch["input_ids"]
        n = len(prompt_ids)
        if input_ids.shape[1] <= n or not (input_ids[:, :n] == prompt_ids).all():
            raise ModelError("the chat template tokenizes the prompt differently inside the conversation, "
                             "so the prompt cannot be masked; check the processor's chat template")
        labels = input_ids.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        labels[:, :n] = IGNORE_INDEX
        return labels

    @property
    def stop_token_ids(self) -> set[int]:
        """The assistant turn ends at <end_of_turn> (Gemma) besides the tokenizer's own end tokens."""
        ids = self.tokenizer.convert_tokens_to_ids(CHAT_TURN_TOKENS[1:])
        return super().stop_token_ids | {i for i in ids if i is not None and i != self.tokenizer.unk_token_id}

    def generate_scored(self, rows: Sequence[dict], settings):
        device = model_device(self.model)
        batch = {k: v.to(device) for k, v in self.collate(rows, train=False).items()}
        out = self.model.generate(**batch, max_new_tokens=settings.max_new_tokens,
                                  min_new_tokens=settings.min_new_tokens, num_beams=settings.num_beams,
                                  do_sample=False, output_scores=True, return_dict_in_generate=True)
        new_tokens = out.sequences[:, batch["input_ids"].shape[1]:]
        return Generated(new_tokens, token_logprobs(self.model, out, settings.num_beams))


def train_chat_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, with Gemma 3's special and turn tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [CHAT_SPECIAL_TOKENS[k] for k in ("pad_token", "eos_token", "bos_token", "unk_token")]
    specials += CHAT_TURN_TOKENS + [CHAT_SPECIAL_TOKENS[k] for k in ("boi_token", "eoi_token", "image_token")]
    tokenizer = Tokenizer(models.BPE(unk_token=CHAT_SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    named = {k: v for k, v in CHAT_SPECIAL_TOKENS.items() if k in ("pad_token", "eos_token", "bos_token", "unk_token")}
    extra = {k: v for k, v in CHAT_SPECIAL_TOKENS.items() if k not in named}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, extra_special_tokens=extra, **named)
