"""Shared fixtures. Real data lives in ../shared/data beside the checkout; tests that need it skip without it."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip that says why."""
    if not (SHARED_DATA / "wbcatt").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the checkout in CI; see README)")
    return SHARED_DATA


TINY_BLIP = dict(  # seconds to build and run on a CPU; random weights
    backend="blip", init="scratch", vocab_size=400,
    vision_config=dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2),
    text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
)


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory) -> Path:
    """A saved random tiny BLIP whose tokenizer was trained on synthetic captions."""
    from hemcap.captions import caption_variants
    from hemcap.config import ModelConfig
    from hemcap.models import load_backend
    from hemcap.synthetic import make_cells

    captions = [c for _, attributes in make_cells(40, seed=5, size=32) for c in caption_variants(attributes, n_paraphrases=2)]
    backend = load_backend(ModelConfig(**TINY_BLIP), captions=captions)
    return backend.save(tmp_path_factory.mktemp("tiny_blip"))
