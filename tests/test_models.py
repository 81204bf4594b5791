"""Backends on tiny random models: special tokens, loss masks, LoRA targets, precision, checkpointing."""

import copy

import numpy as np
import pytest
import torch

from hemcap.captions import caption_variants
from hemcap.config import LoraConfig, ModelConfig
from hemcap.models import (
    IGNORE_INDEX, ModelError, add_lora, count_parameters, enable_gradient_checkpointing, load_backend, load_trained,
    lora_targets)
from hemcap.synthetic import sample_attributes

BLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2)
BLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=128)
HEMBLIP_TARGETS = ["crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                   "crossattention.output.dense"]


def texts(backend, rows, max_new_tokens):
    """Greedy captions through the engine (the one decoding path)."""
    from hemcap.engine import CaptionEngine, EngineSettings

    settings = EngineSettings(max_new_tokens=max_new_tokens, device="cpu")
    return [c.text for c in CaptionEngine(backend, settings=settings).caption_rows(rows)]



@pytest.fixture(scope="module")
def captions():
    rng = np.random.default_rng(0)
    return [c for _ in range(12) for c in caption_variants(sample_attributes(rng), "wbcatt", 2, 0)]


def blip_config(**changes) -> ModelConfig:
    return ModelConfig(name_or_path=None, backend="blip", init="scratch", vocab_size=300, max_length=64,
                       vision_config=dict(BLIP_VISION), text_config=dict(BLIP_TEXT), **changes)


def chat_config(**changes) -> ModelConfig:
    return ModelConfig(name_or_path=None, backend="chat", init="scratch", vocab_size=400, **changes)


def rows(captions, n=3, size=32):
    generator = torch.Generator().manual_seed(0)
    return [{"pixels": torch.rand(3, size, size, generator=generator), "caption": c} for c in captions[:n]]


@pytest.fixture(scope="module")
def blip(captions):
    torch.manual_seed(0)
    return load_backend(blip_config(), captions)


@pytest.fixture(scope="module")
def chat(captions):
    torch.manual_seed(0)
    return load_backend(chat_config(), captions)


# ------------------------------------------------------------------------------ BLIP


def test_blip_scratch_special_ids_match_its_tokenizer(blip):
    text, tok = blip.model.config.text_config, blip.tokenizer
    assert (text.pad_token_id, text.sep_token_id, text.bos_token_id) == (tok.pad_token_id, tok.sep_token_id,
                                                                          tok.cls_token_id)
    assert text.vocab_size == len(tok)


def test_blip_mismatched_special_ids_are_refused(blip):
    broken = copy.deepcopy(blip)
    broken.model.config.text_config.pad_token_id = 7
    broken.model.config.text_config.sep_token_id = 8
    with pytest.raises(ModelError) as error:
        broken.check_special_tokens()
    assert "pad_token_id 7" in str(error.value) and "sep_token_id 8" in str(error.value)


def test_blip_scratch_vision_embeddings_are_not_near_zero(blip):
    from transformers import BlipVisionConfig, BlipVisionModel

    embeddings = blip.model.vision_model.embeddings
    assert embeddings.position_embedding.std() > 0.01 and embeddings.class_embedding.std() > 0.01
    # the trap: the config's default initializer_range (1e-10) leaves them at ~0
    default = BlipVisionModel(BlipVisionConfig(**BLIP_VISION))
    assert default.embeddings.position_embedding.std() < 1e-6


def test_blip_collate_masks_padding_and_starts_from_bos(blip, captions):
    short_and_long = [captions[0][:20], captions[1]]
    batch = blip.collate(rows(short_and_long, n=2), train=True)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (mask[0] == 0).any(), "the short caption must be padded"
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (labels[mask == 1] == batch["input_ids"][mask == 1]).all()
    assert (batch["input_ids"][:, 0] == blip.model.config.text_config.bos_token_id).all()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def test_blip_loss_ignores_padding(blip, captions):
    """A caption's loss is the same alone and beside a longer caption that pads it."""
    blip.model.eval()
    short = rows([captions[0][:25]], n=1)
    alone = blip.collate(short, train=True)
    padded = blip.collate(short + rows([captions[3]], n=1), train=True)
    padded = {k: v[:1] for k, v in padded.items()}
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        assert torch.allclose(blip.model(**alone).loss, blip.model(**padded).loss, atol=1e-5)


def test_blip_generates_text_and_reloads(blip, captions, tmp_path):
    from hemcap.engine import EngineSettings

    before = texts(blip, rows(captions), 5)
    assert len(before) == 3 and all(isinstance(t, str) for t in before)
    ids, logprobs, heads = blip.generate_scored(rows(captions), EngineSettings(max_new_tokens=5))
    assert ids.shape == logprobs.shape and heads is None  # no refiner to read the heads' log-probabilities
    blip.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert texts(load_trained(tmp_path / "m"), rows(captions), 5) == before


# ------------------------------------------------------------------------------ chat (Gemma 3 class)


def test_chat_labels_cover_the_answer_only(chat, captions):
    batch = chat.collate(rows(captions, n=2), train=True)
    labels, ids = batch["labels"], batch["input_ids"]
    prompt_len = chat.collate(rows(captions, n=1), train=False)["input_ids"].shape[1]
    assert (labels[:, :prompt_len] == IGNORE_INDEX).all(), "system, user turn and image tokens carry no loss"
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    image_token = chat.model.config.image_token_id
    assert (labels[ids == image_token] == IGNORE_INDEX).all() and (ids == image_token).any()
    for i, caption in enumerate(captions[:2]):
        answer = chat.tokenizer.decode(labels[i][labels[i] != IGNORE_INDEX])
        assert answer.startswith(caption) and "<end_of_turn>" in answer  # the model learns to stop


def test_chat_prompt_holds_system_prompt_and_image(chat):
    text = chat.processor.apply_chat_template(chat.messages(), tokenize=False, add_generation_prompt=True)
    assert chat.info.system_prompt in text and "<start_of_image>" in text
    assert text.endswith("<start_of_turn>model\n")


def test_chat_generates_and_reloads(chat, captions, tmp_path):
    before = texts(chat, rows(captions), 4)
    chat.save(tmp_path / "chat")
    again = load_trained(tmp_path / "chat")
    assert again.kind == "chat" and again.info.prompt == chat.info.prompt
    assert texts(again, rows(captions), 4) == before


# ------------------------------------------------------------------------------ LoRA


def test_lora_target_that_matches_nothing_lists_the_layers(captions):
    backend = load_backend(blip_config(), captions)
    with pytest.raises(ModelError) as error:
        add_lora(backend, LoraConfig(target_modules=["crossattention.self.query", "q_proj"]), freeze_vision=True)
    message = str(error.value)
    assert "['q_proj'] match no module" in message
    assert "text_decoder.bert.encoder.layer.*.crossattention.self.query" in message


def test_lora_target_in_a_frozen_tower_fails(captions):
    backend = load_backend(blip_config(), captions)
    with pytest.raises(ModelError, match="frozen vision tower"):
        add_lora(backend, LoraConfig(target_modules=["qkv"]), freeze_vision=True)
    with pytest.raises(ModelError, match="matches no module"):
        add_lora(backend, LoraConfig(target_modules=r".*\.nothing_like_this"), freeze_vision=False)


def test_all_linear_leaves_out_the_frozen_tower_and_the_output_head(chat):
    targets = lora_targets(chat.model, "all-linear", chat.vision_prefix)
    assert targets and not any(t.startswith("model.vision_tower.") for t in targets)
    assert "lm_head" not in targets
    assert any(t.startswith("model.vision_tower.") for t in lora_targets(chat.model, "all-linear", None))


def test_lora_trains_only_adapters_kept_in_fp32_on_a_half_base(captions):
    backend = load_backend(blip_config(), captions, dtype=torch.float16)
    total_before = count_parameters(backend.model)[1]
    targets = add_lora(backend, LoraConfig(target_modules=HEMBLIP_TARGETS), freeze_vision=True)
    assert len(targets) == 4 * BLIP_TEXT["num_hidden_layers"]
    trainable = {n: p for n, p in backend.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in backend.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.float16 for p in frozen)
    n_trainable, total = count_parameters(backend.model)
    assert n_trainable == sum(p.numel() for p in trainable.values()) and total > total_before


def test_gradient_checkpointing_works_with_lora(captions):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backend = load_backend(blip_config(), captions)
        add_lora(backend, LoraConfig(target_modules=HEMBLIP_TARGETS, dropout=0.0), freeze_vision=True)
        if checkpointing:
            enable_gradient_checkpointing(backend)
        backend.model.train()
        assert backend.model.is_activation_checkpointing == checkpointing
        backend.model(**backend.collate(rows(captions), train=True)).loss.backward()
        grads.append({n: p.grad for n, p in backend.model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert all(g is not None for g in checkpointed.values())
    assert any(g.abs().sum() > 0 for g in checkpointed.values())
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_scratch_lora_adapter_reloads_with_its_base(captions, tmp_path):
    torch.manual_seed(0)
    backend = load_backend(blip_config(), captions)
    backend.save_base(tmp_path / "base")
    add_lora(backend, LoraConfig(target_modules=HEMBLIP_TARGETS), freeze_vision=True)
    with torch.no_grad():  # move the adapter away from its zero start
        for name, param in backend.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    backend.model.eval()
    expected = texts(backend, rows(captions), 6)
    backend.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "base_model" / "model.safetensors").is_file()
    assert texts(load_trained(tmp_path / "adapter"), rows(captions), 6) == expected


def test_an_adapter_loads_from_safetensors_only(captions, tmp_path):
    """PEFT falls back to a pickled adapter_model.bin, which can run code when unpickled."""
    from safetensors.torch import load_file

    backend = load_backend(blip_config(), captions)
    backend.save_base(tmp_path / "base")
    add_lora(backend, LoraConfig(target_modules=HEMBLIP_TARGETS), freeze_vision=True)
    folder = tmp_path / "adapter"
    backend.save(folder)
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(weights), folder / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match=r"adapter has no adapter_model.safetensors .*pickle"):
        load_trained(folder)



# ------------------------------------------------------------------------------ attribute heads


def test_attribute_heads_add_their_loss_and_learn_the_captions_attributes(captions):
    from hemcap.captions import parse
    from hemcap.models.heads import heads_of

    torch.manual_seed(0)
    backend = load_backend(blip_config(attribute_loss=0.5), captions)
    batch = backend.collate(rows(captions, n=4), train=True)
    schema = backend.schema
    expected = [[schema.values(f).index(v) for f, v in parse(c).items()] for c in captions[:4]]
    assert batch["attribute_labels"].tolist() == expected  # read back from the training captions
    caption_only = backend.model(**{k: v for k, v in batch.items() if k != "attribute_labels"}).loss
    heads = heads_of(backend.model)
    loss = backend.training_loss(backend.model, dict(batch))
    pooled = backend.model.vision_model(pixel_values=batch["pixel_values"])[0][:, 0]
    assert torch.allclose(loss, caption_only + 0.5 * heads.loss(pooled, batch["attribute_labels"]), atol=1e-5)
    loss.backward()
    assert heads.linear["nucleus_shape"].weight.grad.abs().sum() > 0
    assert backend.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_attribute_heads_are_saved_beside_a_plain_model_and_restored(captions, tmp_path):
    from transformers import BlipForConditionalGeneration

    from hemcap.models.heads import HEADS_FILE, heads_of

    backend = load_backend(blip_config(attribute_loss=1.0), captions)
    backend.save(tmp_path / "m")
    assert (tmp_path / "m" / HEADS_FILE).is_file() and heads_of(backend.model) is not None
    reloaded = load_trained(tmp_path / "m")
    assert reloaded.info.attribute_heads["fields"]["nucleus_shape"] == 6
    for name, tensor in heads_of(backend.model).state_dict().items():
        assert torch.equal(heads_of(reloaded.model).state_dict()[name], tensor)
    plain = BlipForConditionalGeneration.from_pretrained(tmp_path / "m")  # no unknown keys in its weights
    assert not hasattr(plain, "attribute_heads")
    (tmp_path / "m" / HEADS_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        load_trained(tmp_path / "m")
    from hemcap.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.attribute_loss=-1.0 should be between 0.0 and 100.0"):
        blip_config(attribute_loss=-1.0)
    from hemcap.config import RunConfig

    with pytest.raises(ConfigError, match="the attribute heads train with the whole model, not under LoRA"):
        RunConfig.from_dict({"model": {"attribute_loss": 1.0}, "lora": {"enabled": True}})


def test_mixup_blends_image_pairs_and_weights_both_captions_losses_by_their_shares(captions):
    torch.manual_seed(0)
    backend = load_backend(blip_config(attribute_loss=0.5, mixup=0.4), captions)
    model, batch = backend.model, backend.collate(rows(captions, n=4), train=True)
    torch.manual_seed(1)
    loss = backend.training_loss(model, dict(batch))
    torch.manual_seed(1)  # the same draws: the share, then the partners
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(4)
    mixed = lam * batch["pixel_values"] + (1 - lam) * batch["pixel_values"][perm]
    expected = 0.0
    for share, order in ((lam, torch.arange(4)), (1 - lam, perm)):
        out = model(pixel_values=mixed, input_ids=batch["input_ids"][order],
                    attention_mask=batch["attention_mask"][order], labels=batch["labels"][order])
        heads = backend.info.attribute_heads["weight"] * model.attribute_heads.loss(
            out.image_embeds[:, 0], batch["attribute_labels"][order])
        expected = expected + share * (out.loss + heads)
    assert 0 < lam < 1 and perm.tolist() != [0, 1, 2, 3]
    assert torch.allclose(loss, expected, atol=1e-5)
    model.eval()  # outside training, the plain loss of the batch as it is
    plain = backend.training_loss(model, dict(batch))
    model.train()
    assert not torch.allclose(plain, loss)
    from hemcap.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.mixup=-1.0 should be between"):
        blip_config(mixup=-1.0)


def test_focal_loss_weights_each_term_by_one_minus_its_probability(captions):
    from hemcap.models.base import focal_cross_entropy

    logits, labels = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]]), torch.tensor([0, 0, IGNORE_INDEX])
    p = torch.softmax(logits, -1)[[0, 1], [0, 0]]
    assert torch.allclose(focal_cross_entropy(logits, labels, 2.0), ((1 - p) ** 2 * -p.log()).mean())
    assert torch.allclose(focal_cross_entropy(logits, labels, 0.0),
                          torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX))
    torch.manual_seed(0)
    backend = load_backend(blip_config(attribute_loss=1.0, focal=2.0), captions)
    batch = backend.collate(rows(captions, n=4), train=True)
    focal = backend.training_loss(backend.model, dict(batch))
    backend.focal = 0.0
    assert 0 < focal < backend.training_loss(backend.model, dict(batch))  # every term weighted by less than 1
    from hemcap.config import ConfigError

    with pytest.raises(ConfigError, match="focal: use either it or label_smoothing"):
        blip_config(focal=2.0, label_smoothing=0.1)


# ------------------------------------------------------------------------------ convolutional stem


def test_conv_stem_replaces_the_patch_layer_and_reloads_with_its_weights(captions, tmp_path):
    from hemcap.models.stem import ConvStem

    torch.manual_seed(0)
    backend = load_backend(blip_config(vision_stem="conv"), captions)
    stem = backend.model.vision_model.embeddings.patch_embedding
    assert isinstance(stem, ConvStem)
    assert backend.info.vision_stem == {"kind": "conv", "dim": 32, "widths": [32, 64, 128]}
    backend.model.train()
    backend.model(**backend.collate(rows(captions), train=True)).loss.backward()  # moves the batch-norm statistics
    assert stem.layers[0].weight.grad.abs().sum() > 0
    backend.model.eval()
    expected = texts(backend, rows(captions), 6)
    backend.save(tmp_path / "m")
    reloaded = load_trained(tmp_path / "m")
    assert texts(reloaded, rows(captions), 6) == expected
    for name, tensor in stem.state_dict().items():  # the batch-norm statistics too
        assert torch.equal(reloaded.model.vision_model.embeddings.patch_embedding.state_dict()[name], tensor), name
    assert reloaded.info.vision_stem == backend.info.vision_stem
    assert not reloaded.model.vision_model.embeddings.patch_embedding.training  # loaded in eval mode, like the rest


def test_a_lora_adapter_reloads_on_a_base_with_a_conv_stem(captions, tmp_path):
    torch.manual_seed(0)
    backend = load_backend(blip_config(vision_stem="conv"), captions)
    backend.save_base(tmp_path / "base")
    add_lora(backend, LoraConfig(target_modules=HEMBLIP_TARGETS), freeze_vision=True)
    backend.model.eval()
    expected = texts(backend, rows(captions), 6)
    backend.save(tmp_path / "adapter")
    assert texts(load_trained(tmp_path / "adapter"), rows(captions), 6) == expected


def test_conv_stem_settings_that_cannot_work_are_refused():
    from hemcap.config import ConfigError

    with pytest.raises(ConfigError, match=r"vision_stem.*one of"):
        blip_config(vision_stem="resnet")
    with pytest.raises(ConfigError, match=r"vision_stem: conv is built with random weights, for a blip backend with "
                                          r"init=scratch only"):
        ModelConfig(name_or_path="Salesforce/blip-image-captioning-base", vision_stem="conv")
    with pytest.raises(ConfigError, match=r"vision_stem: conv .* for a blip backend"):
        chat_config(vision_stem="conv")
    with pytest.raises(ValueError, match=r"patch_size of 2 to 64 that is a power of two, not 12"):
        load_backend(ModelConfig(name_or_path=None, backend="blip", init="scratch", vision_stem="conv",
                                 vision_config={**BLIP_VISION, "patch_size": 12}, text_config=BLIP_TEXT), ["a b"])


# ------------------------------------------------------------------------------ QLoRA


def test_qlora_runs_on_cpu_through_bitsandbytes(chat, tmp_path):
    """bitsandbytes >= 0.48 has a CPU backend: nf4 loading and a LoRA step work, slowly."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    chat.save(tmp_path / "base")
    backend = load_backend(ModelConfig(name_or_path=str(tmp_path / "base"), backend="chat"), dtype=torch.bfloat16,
                           quantize="nf4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in backend.model.modules())
    add_lora(backend, LoraConfig(r=4, alpha=4), freeze_vision=False)
    loss = backend.model(**backend.collate(rows(["a small round lymphocyte"] * 2, n=2), train=True)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in backend.model.parameters() if p.requires_grad)
