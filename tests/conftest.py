"""Shared fixtures. Real data lives in ../shared/data beside the checkout; tests that need it skip without it."""

from pathlib import Path

import numpy as np
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


# ------------------------------------------------------------------------------ smear tests (test_smear_*.py)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model is 4-7x faster on one thread than on two on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight BLIP saved as ``hemcap train`` saves one (64 px input, 300-token vocabulary)."""
    from hemcap.captions import render
    from hemcap.config import ModelConfig
    from hemcap.models import load_backend
    from hemcap.synthetic import sample_attributes

    rng = np.random.default_rng(0)
    captions = [render(sample_attributes(rng)) for _ in range(64)]
    layers = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = ModelConfig(name_or_path=None, backend="blip", init="scratch", vocab_size=300, max_length=64,
                         vision_config=dict(image_size=64, patch_size=16, **layers), text_config=layers)
    return load_backend(config, captions).save(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    """The tiny BLIP as a captioning engine: its captions are noise, the pipeline's mechanics are not."""
    from hemcap.engine import CaptionEngine

    return CaptionEngine.from_dir(model_dir, max_new_tokens=6)  # short captions: the tests time the pipeline


@pytest.fixture(scope="module")
def pipeline(engine):
    """The stain detector at the synthetic smears' scale before the tiny captioner."""
    from hemcap.smear import SmearPipeline, StainDetector, StainDetectorConfig

    synthetic = StainDetectorConfig(scale=0.6)  # synthetic smears: red cells ~60 px across, BCCD's ~100
    return SmearPipeline(engine, StainDetector(synthetic))


@pytest.fixture(scope="session")
def smears(tmp_path_factory) -> Path:
    """Four synthetic smears with their true boxes (``annotations.json``)."""
    from hemcap.synthetic import write_smears

    return write_smears(tmp_path_factory.mktemp("smears") / "set", 4, seed=3)
