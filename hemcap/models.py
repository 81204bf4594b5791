"""Model backends: the only module that knows model classes by name.

Two backends share one small interface (``Backend``):

- ``BlipBackend``: ``BlipForConditionalGeneration`` with its ``BlipProcessor``. The caption is
  the decoder's whole text; it starts from ``bos_token_id`` as ``generate()`` does.
- ``ChatBackend``: an image-text-to-text chat model (MedGemma / Gemma 3 class) through
  ``AutoModelForImageTextToText`` and ``AutoProcessor``. The caption is the assistant's turn
  after a system prompt and a user turn holding the image; only the assistant's tokens carry loss.

``load_backend`` builds one from a ``ModelConfig`` (a Hub id, a local dir, or ``init: scratch``:
random weights and a tokenizer trained on the training captions); ``load_trained`` reloads a
directory that ``Backend.save`` wrote (full model, or LoRA adapter plus its base).
``add_lora`` wraps the model in PEFT adapters after checking where they land.

Every ``Backend`` takes rows: dicts with ``pixels`` (a float tensor in [0, 1], already at
``image_size``) or ``image`` (a PIL image), plus ``caption`` when training.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Sequence

from hemcap.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

MODEL_INFO_FILE = "hemcap_model.json"  # backend kind and prompts, beside the weights
MODEL_FILES = ("config.json", "adapter_config.json")  # a saved model dir holds one of these
BASE_MODEL_DIR = "base_model"  # a scratch base saved inside its LoRA adapter's dir
IGNORE_INDEX = -100  # label value the loss skips

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
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


class ModelError(ValueError):
    """A model, tokenizer or adapter setting that cannot work; the message says what to change."""


# ------------------------------------------------------------------------------ the interface


class Backend:
    """A captioning model with its processor: batches in, captions out."""

    kind = ""
    vision_prefixes: tuple[str, ...] = ()  # module-name prefixes of the vision tower

    def __init__(self, model, processor, settings: dict):
        self.model = model
        self.processor = processor
        self.settings = dict(settings)  # prompts and max_length; saved in MODEL_INFO_FILE
        self.base_dir: Path | None = None  # where a scratch base was saved, for its LoRA adapter

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model takes; images are resized to it once, before training."""
        size = self.processor.image_processor.size
        size = size if isinstance(size, dict) else vars(size)
        if not size.get("height") or not size.get("width"):
            raise ModelError(f"image processor size {size} has no height/width; hemcap needs a fixed input size")
        return int(size["height"]), int(size["width"])

    @property
    def vision_prefix(self) -> str | None:
        """Full module name of the vision tower (inside a PEFT wrapper too), or None."""
        names = [name for name, _ in self.model.named_modules()]
        for prefix in self.vision_prefixes:
            found = [n for n in names if n == prefix or n.endswith("." + prefix)]
            if found:
                return min(found, key=len)
        return None

    def image_kwargs(self, rows: Sequence[dict]) -> tuple[list, dict]:
        """The rows' images and the processor options for them: tensors are resized and scaled already."""
        if all("pixels" in r for r in rows):
            return [r["pixels"] for r in rows], {"do_resize": False, "do_rescale": False}
        return [r["image"] for r in rows], {}

    def pixel_values(self, rows: Sequence[dict]):
        images, options = self.image_kwargs(rows)
        return self.processor.image_processor(images=images, return_tensors="pt", **options)["pixel_values"]

    def collate(self, rows: Sequence[dict], train: bool) -> dict:
        """Model inputs for ``rows``; with ``train``, also ``labels`` (IGNORE_INDEX where no loss)."""
        raise NotImplementedError

    def generate(self, rows: Sequence[dict], max_new_tokens: int = 96, num_beams: int = 1) -> list[str]:
        """One caption per row."""
        raise NotImplementedError

    def save(self, out_dir: str | Path) -> Path:
        """Write the model (or adapter, with a scratch base beside it), processor and MODEL_INFO_FILE."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if is_peft(self.model):  # embedding layers are saved through modules_to_save when trained
            self.model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
        else:
            self.model.save_pretrained(out_dir, safe_serialization=True)
        self.processor.save_pretrained(out_dir)
        if is_peft(self.model) and self.base_dir is not None:
            shutil.copytree(self.base_dir, out_dir / BASE_MODEL_DIR, dirs_exist_ok=True)
        info = {"kind": self.kind, "adapter": is_peft(self.model), **self.settings}
        (out_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return out_dir

    def save_base(self, out_dir: str | Path) -> None:
        """Save a scratch base before LoRA wraps it: its adapter is useless without these weights."""
        self.save(out_dir)
        self.base_dir = Path(out_dir)


class BlipBackend(Backend):
    kind = "blip"
    vision_prefixes = ("vision_model",)

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
                                 max_length=self.settings["max_length"], return_tensors="pt")
        input_ids = encoded["input_ids"]
        input_ids[:, 0] = self.model.config.text_config.bos_token_id  # generate() starts from it too
        batch.update(input_ids=input_ids, attention_mask=encoded["attention_mask"],
                     labels=input_ids.masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX))
        return batch

    def generate(self, rows: Sequence[dict], max_new_tokens: int = 96, num_beams: int = 1) -> list[str]:
        pixel_values = self.collate(rows, train=False)["pixel_values"].to(_device(self.model))
        ids = self.model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def vision_chunk(self) -> int:
        """Images per vision-tower call: on a CPU, as many as keep one layer's activations within 4 MiB.

        That gives 2 at BLIP-base (577 tokens x 768, 1.8 MiB per image; batches of 8 ran 30 %
        slower per image) and 32 at the small 128 px model (65 x 256), as fast as 16 there
        (eval/bench_captioning.py). On a GPU, one large batch.
        """
        vision = self.model.config.vision_config
        if _device(self.model).type != "cpu":
            return 64
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        per_image = tokens * vision.hidden_size * 4
        return max(1, min(64, 2 ** int(math.log2(max(1, (4 << 20) // per_image)))))

    def encode_images(self, pixel_values, chunk: int | None = None):
        """Vision features, ``chunk`` images per vision-tower call (the engine's fast path)."""
        import torch

        from hemcap.attention import fast_attention

        device, chunk = _device(self.model), chunk or self.vision_chunk()
        with fast_attention(self.model):
            parts = [self.model.vision_model(pixel_values=pixel_values[i : i + chunk].to(device))[0]
                     for i in range(0, len(pixel_values), chunk)]
        return torch.cat(parts)

    def decode(self, image_embeds, max_new_tokens: int, num_beams: int = 1, min_new_tokens: int = 0):
        """(new token ids, their log-probabilities) for encoded images, decoded as BLIP's generate does."""
        import torch

        from hemcap.attention import fast_attention

        text = self.model.config.text_config
        bos = torch.full((len(image_embeds), 1), text.bos_token_id, dtype=torch.long, device=image_embeds.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        with fast_attention(self.model):
            out = self.model.text_decoder.generate(
                input_ids=bos, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=False,
                output_scores=True, return_dict_in_generate=True)
        return out.sequences[:, 1:], _token_logprobs(self.model.text_decoder, out, num_beams)


class ChatBackend(Backend):
    kind = "chat"
    vision_prefixes = ("model.vision_tower", "vision_tower", "model.visual", "visual")

    def messages(self, answer: str | None = None) -> list[dict]:
        messages = []
        if self.settings.get("system_prompt"):
            messages.append({"role": "system", "content": [{"type": "text", "text": self.settings["system_prompt"]}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.settings["prompt"]}]})
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

    def generate(self, rows: Sequence[dict], max_new_tokens: int = 96, num_beams: int = 1) -> list[str]:
        device = _device(self.model)
        batch = {k: v.to(device) for k, v in self.collate(rows, train=False).items()}
        ids = self.model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        new_tokens = ids[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The assistant turn ends at <end_of_turn> (Gemma) besides the tokenizer's eos."""
        ids = self.tokenizer.convert_tokens_to_ids(CHAT_TURN_TOKENS[1:])
        return tuple(i for i in ids if i is not None and i != self.tokenizer.unk_token_id)

    def generate_scored(self, rows: Sequence[dict], max_new_tokens: int, num_beams: int = 1, min_new_tokens: int = 0):
        """(new token ids, their log-probabilities) for a batch of rows (the engine's path)."""
        device = _device(self.model)
        batch = {k: v.to(device) for k, v in self.collate(rows, train=False).items()}
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  num_beams=num_beams, do_sample=False, output_scores=True, return_dict_in_generate=True)
        new_tokens = out.sequences[:, batch["input_ids"].shape[1]:]
        return new_tokens, _token_logprobs(self.model, out, num_beams)


def _token_logprobs(model, out, num_beams: int):
    """Log-probability of each generated token; beam search scores are already normalised."""
    return model.compute_transition_scores(out.sequences, out.scores, getattr(out, "beam_indices", None),
                                           normalize_logits=num_beams == 1)


BACKENDS = {"blip": BlipBackend, "chat": ChatBackend}


def _device(model):
    return next(model.parameters()).device


def _settings(cfg: ModelConfig) -> dict:
    return {"prompt": cfg.prompt, "system_prompt": cfg.system_prompt, "max_length": cfg.max_length}


# ------------------------------------------------------------------------------ building


def load_backend(cfg: ModelConfig, captions: Sequence[str] = (), dtype=None, quantize: str | None = None) -> Backend:
    """The backend ``cfg`` describes. ``captions`` train the tokenizer for init=scratch."""
    if cfg.init == "scratch":
        if not captions:
            raise ModelError("init=scratch trains its tokenizer on the training captions, and none were given")
        kind = cfg.backend
        model, processor = (_scratch_blip if kind == "blip" else _scratch_chat)(cfg, list(captions))
        if dtype is not None:
            model.to(dtype)
    else:
        kind = cfg.backend if cfg.backend != "auto" else _detect_kind(cfg.name_or_path, cfg)
        model, processor = _load_pretrained(kind, cfg.name_or_path, dtype=dtype, quantize=quantize,
                                            revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    backend = BACKENDS[kind](model, processor, _settings(cfg))
    configure(backend, cfg)
    return backend


def configure(backend: Backend, cfg: ModelConfig) -> None:
    """Apply the training settings of ``cfg`` that live on the model rather than in its weights."""
    if isinstance(backend, BlipBackend):
        backend.check_special_tokens()
        backend.model.text_decoder.label_smoothing = cfg.label_smoothing  # read at init; set it for loaded models too
    if cfg.freeze_vision and not is_peft(backend.model):  # under LoRA the whole base is frozen already
        frozen = freeze_vision(backend)
        log.info("vision tower frozen: %s parameters", f"{frozen:,}")


def enable_gradient_checkpointing(backend: Backend) -> None:
    """Recompute activations in backward, non-reentrant: it needs no input gradients, so it works
    with frozen embeddings under LoRA. Call it after ``add_lora``: PEFT, seeing checkpointing on,
    would hook the input embeddings for the reentrant kind, which breaks BLIP's in-place add."""
    model = backend.model
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _detect_kind(name_or_path: str, cfg: ModelConfig) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as error:
        raise ModelError(f"cannot load the config of {name_or_path!r} (a Hub id needs the network or a cached copy; "
                         f"a local dir needs config.json): {error}") from error
    return "blip" if config.model_type == "blip" else "chat"


def _load_pretrained(kind: str, name_or_path, dtype=None, quantize=None, revision=None, trust_remote_code=False):
    return (_load_model(kind, name_or_path, dtype, quantize, revision, trust_remote_code),
            _load_processor(name_or_path, revision, trust_remote_code))


def _load_model(kind: str, name_or_path, dtype=None, quantize=None, revision=None, trust_remote_code=False):
    """Weights from safetensors only; 4-bit through bitsandbytes when ``quantize`` is set."""
    from transformers import AutoModelForImageTextToText, BlipForConditionalGeneration

    model_cls = BlipForConditionalGeneration if kind == "blip" else AutoModelForImageTextToText
    options = dict(revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True)
    if quantize:
        options["quantization_config"] = _quantization_config(quantize)
    try:
        model = model_cls.from_pretrained(name_or_path, dtype=dtype, **options)
    except OSError as error:
        raise ModelError(f"cannot load {name_or_path!r}: {error}") from error
    return _prepare_quantized(model) if quantize else model


def _load_processor(name_or_path, revision=None, trust_remote_code=False):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelError(f"cannot load the processor of {name_or_path!r}: {error}") from error


def _quantization_config(quantize: str):
    """QLoRA's nf4 with double quantization, computing in bf16 (Google's MedGemma recipe)."""
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        log.warning("QLoRA without CUDA runs on bitsandbytes' CPU backend: it works but is slow "
                    "(see docs/training.md); use plain LoRA on a CPU")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


def _prepare_quantized(model):
    from peft import prepare_model_for_kbit_training

    # gradient checkpointing is switched on later, from the config, non-reentrant
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


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


def _scratch_blip(cfg: ModelConfig, captions: list[str]):
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
    return BlipForConditionalGeneration(config), processor


def _scratch_chat(cfg: ModelConfig, captions: list[str]):
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


def freeze_vision(backend: Backend) -> int:
    """Stop gradients to the vision tower; the number of parameters frozen."""
    prefix = backend.vision_prefix
    if prefix is None:
        raise ModelError(f"freeze_vision: no vision tower found (looked for {', '.join(backend.vision_prefixes)})")
    frozen = 0
    for name, param in backend.model.named_parameters():
        if name.startswith(prefix + "."):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


# ------------------------------------------------------------------------------ LoRA


def add_lora(backend: Backend, cfg: LoraConfig, freeze_vision: bool) -> list[str]:
    """Wrap ``backend.model`` in LoRA adapters; the names of the modules they wrap.

    Targets are checked first: a target that matches nothing, or one inside a frozen vision
    tower, is an error that lists the model's linear layers. Adapter weights are kept in fp32
    whatever the base's dtype, so fp16/bf16 training updates them at full precision.
    """
    import peft
    import torch

    frozen_prefix = backend.vision_prefix if freeze_vision else None
    targets = lora_targets(backend.model, cfg.target_modules, frozen_prefix)
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                             target_modules=targets, modules_to_save=cfg.modules_to_save or None)
    backend.model = peft.get_peft_model(backend.model, config)
    if backend.base_dir is not None:
        backend.model.peft_config["default"].base_model_name_or_path = BASE_MODEL_DIR
    for param in backend.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return targets


def lora_targets(model, spec: list[str] | str, frozen_prefix: str | None = None) -> list[str]:
    """Full names of the modules ``spec`` selects, as PEFT matches them; errors list what the model has.

    ``spec`` is ``"all-linear"`` (every linear layer but the output head, minus a frozen vision
    tower), one regular expression (full match), or a list of names matched as suffixes.
    """
    import torch

    output = model.get_output_embeddings()
    named = [(n, m) for n, m in model.named_modules() if n]
    if spec == "all-linear":
        chosen = [n for n, m in named if isinstance(m, torch.nn.Linear) and m is not output
                  and not (frozen_prefix and n.startswith(frozen_prefix + "."))]
        if not chosen:
            raise ModelError("lora.target_modules=all-linear found no linear layers outside the frozen vision tower")
        return chosen
    chosen = _match_targets(named, spec, _linear_layer_names(model))
    inside = [n for n in chosen if frozen_prefix and n.startswith(frozen_prefix + ".")]
    if inside:
        raise ModelError(f"lora.target_modules selects {len(inside)} module(s) in the frozen vision tower "
                         f"({frozen_prefix}), e.g. {', '.join(inside[:3])}; narrow the targets or set "
                         f"model.freeze_vision=false")
    return chosen


def _match_targets(named, spec, linear_names: str) -> list[str]:
    if isinstance(spec, str):
        chosen = [n for n, _ in named if re.fullmatch(spec, n)]
        if not chosen:
            raise ModelError(f"lora.target_modules regex {spec!r} matches no module. {linear_names}")
        return chosen
    chosen, unmatched = [], []
    for target in spec:
        hits = [n for n, _ in named if n == target or n.endswith("." + target)]
        chosen += hits
        unmatched += [] if hits else [target]
    if unmatched:
        raise ModelError(f"lora.target_modules {unmatched} match no module. {linear_names}")
    return sorted(set(chosen))


def _linear_layer_names(model, limit: int = 60) -> str:
    """The model's linear layers with layer numbers folded (``...layer.*.crossattention.self.query``)."""
    import torch

    names = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", n) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)})
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return "The model's linear layers are: " + ", ".join(names[:limit]) + more


# ------------------------------------------------------------------------------ reloading


def load_trained(path: str | Path, dtype=None, quantize: str | None = None, is_trainable: bool = False) -> Backend:
    """A backend from a dir written by ``Backend.save``: a full model, or an adapter on its base."""
    path = check_model_dir(path)
    info = _read_json(path / MODEL_INFO_FILE) if (path / MODEL_INFO_FILE).is_file() else {}
    adapter = (path / "adapter_config.json").is_file()
    base = _adapter_base(path) if adapter else path
    kind = info.get("kind") or _detect_kind(str(base), ModelConfig(name_or_path=str(base)))
    model = _load_model(kind, base, dtype=dtype, quantize=quantize)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    processor = _load_processor(path)
    settings = {k: info[k] for k in ("prompt", "system_prompt", "max_length") if k in info}
    return BACKENDS[kind](model, processor, {**_settings(ModelConfig()), **settings})


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a saved model or LoRA adapter."""
    return any((Path(path) / name).is_file() for name in MODEL_FILES)


def check_model_dir(path: str | Path) -> Path:
    """``path``, or FileNotFoundError naming the files a model dir needs."""
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} holds no model (no {' or '.join(MODEL_FILES)})")
    return Path(path)


def _adapter_base(path: Path) -> str | Path:
    """The adapter's base: a dir beside it (relative path) or a Hub id / absolute dir."""
    base = _read_json(path / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path}/adapter_config.json names no base_model_name_or_path")
    return path / base if (path / base).is_dir() else base


def merge_lora(backend: Backend) -> Backend:
    """The same backend with its LoRA adapters merged into the base weights."""
    if not is_peft(backend.model):
        raise ModelError("the model has no LoRA adapter to merge")
    merged = BACKENDS[backend.kind](backend.model.merge_and_unload(), backend.processor, backend.settings)
    return merged


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}: not valid JSON ({error})") from error
