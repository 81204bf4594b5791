import pytest
import torch

from hemcap.models import blip_attention as attention
from hemcap.models.blip_attention import fast_attention
from conftest import TINY_BLIP


@pytest.fixture(scope="module")
def model():
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(0)
    config = BlipConfig(vision_config=TINY_BLIP["vision_config"],
                        text_config={**TINY_BLIP["text_config"], "vocab_size": 97, "bos_token_id": 1, "sep_token_id": 2,
                                     "pad_token_id": 0})
    return BlipForConditionalGeneration(config).eval()


@pytest.fixture
def always_fold(monkeypatch):
    monkeypatch.setattr(attention, "FOLD_MIN_FEATURES", 0)  # the tiny model's features are below the threshold


def test_vision_tower_matches_eager(model):
    pixels = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        eager = model.vision_model(pixel_values=pixels)[0]
        with fast_attention(model):
            fast = model.vision_model(pixel_values=pixels)[0]
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)


def test_folded_cross_attention_matches_eager_logits(model, always_fold):
    features = torch.randn(2, 17, model.config.vision_config.hidden_size)
    ids = torch.randint(3, 97, (2, 9))
    with torch.inference_mode():
        eager = model.text_decoder(input_ids=ids, encoder_hidden_states=features).logits
        with fast_attention(model):
            fast = model.text_decoder(input_ids=ids, encoder_hidden_states=features).logits
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)


def _greedy(model, features, **kwargs):
    text = model.config.text_config
    bos = torch.full((len(features), 1), text.bos_token_id)
    return model.text_decoder.generate(input_ids=bos, encoder_hidden_states=features, max_new_tokens=12, min_new_tokens=12,
                                       eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_is_unchanged(model, always_fold, num_beams):
    features = torch.randn(4, 17, model.config.vision_config.hidden_size)
    with torch.inference_mode():
        eager = _greedy(model, features, num_beams=num_beams)
        with fast_attention(model):
            fast = _greedy(model, features, num_beams=num_beams)
    assert torch.equal(fast.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(fast.scores), torch.stack(eager.scores), rtol=1e-4, atol=1e-4)


def test_patch_is_removed_and_skipped_in_training(model):
    with fast_attention(model):
        assert "forward" in vars(model.vision_model.encoder.layers[0].self_attn)
    assert all("forward" not in vars(m) and "_eager_forward" not in vars(m) for m in model.modules())
    model.train()
    try:
        with fast_attention(model):
            assert all("forward" not in vars(m) for m in model.modules())
    finally:
        model.eval()


def test_lora_wrapped_projections_are_not_folded(model, always_fold):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["key", "value"], init_lora_weights=False)).eval()
    features = torch.randn(2, 17, model.config.vision_config.hidden_size)
    ids = torch.randint(3, 97, (2, 5))
    decoder = peft_model.base_model.model.text_decoder
    with torch.inference_mode():
        eager = decoder(input_ids=ids, encoder_hidden_states=features).logits
        with fast_attention(peft_model):
            crossed = [m for m in decoder.modules() if "_eager_forward" in vars(m)]
            fast = decoder(input_ids=ids, encoder_hidden_states=features).logits
    assert crossed == []
    torch.testing.assert_close(fast, eager)
