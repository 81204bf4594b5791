import pytest
import torch

from hemcap.captions import tidy
from hemcap.engine import CaptionEngine, EngineSettings
from hemcap.synthetic import make_cells


@pytest.fixture(scope="module")
def cells():
    return [image for image, _ in make_cells(6, seed=3, size=64)]


def naive_ids(engine, image, max_new_tokens):
    """One `model.generate` per image, as in the HF BLIP notebook."""
    backend = engine.backend
    pixel_values = backend.pixel_values([{"image": image}]).to(backend.model.device)  # the engine may have put it on a GPU
    ids = backend.model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens)
    ids = ids[0, 1:].tolist()  # drop the start token
    stop = {backend.tokenizer.sep_token_id, backend.tokenizer.pad_token_id}
    return ids[: next((i for i, t in enumerate(ids) if t in stop), len(ids))]


def test_batched_greedy_matches_one_generate_per_image(tiny_blip_dir, cells):
    engine = CaptionEngine.from_dir(tiny_blip_dir, max_new_tokens=24, vision_chunk=2, decode_chunk=4)
    captions = engine.caption(cells)
    with torch.inference_mode():
        assert [c.token_ids for c in captions] == [naive_ids(engine, im, 24) for im in cells]


def test_a_model_that_sees_the_centre_captions_an_image_as_its_centre(tiny_blip_dir, cells, monkeypatch):
    from hemcap.images import centre_square

    engine = CaptionEngine.from_dir(tiny_blip_dir, max_new_tokens=12)
    centres = [centre_square(image, 0.5) for image in cells]
    expected = [c.token_ids for c in engine.caption(centres)]
    monkeypatch.setattr(engine.backend.info, "centre_crop", 0.5)
    assert engine.seen(cells[0]).size == (64, 64) and [c.token_ids for c in engine.caption(cells)] == expected
    with torch.inference_mode():
        assert [naive_ids(engine, im, 12) for im in cells] == expected  # the backend's own pixels crop alike


def test_with_stain_normalisation_the_model_is_given_the_training_cache_pixels(tiny_blip_dir, cells, monkeypatch):
    import datasets

    from hemcap.domain import measure_domain
    from hemcap.inputs import map_split

    engine = CaptionEngine.from_dir(tiny_blip_dir, max_new_tokens=12)
    domain = measure_domain(cells, "anchors", crop=0.5)
    monkeypatch.setattr(engine, "domain", domain)
    monkeypatch.setattr(engine.backend.info, "centre_crop", 0.5)
    split = datasets.Dataset.from_dict({"id": [str(i) for i in range(len(cells))], "image": cells},
                                       features=datasets.Features({"id": datasets.Value("string"),
                                                                   "image": datasets.Image()}))  # stored lossless
    cache, _ = map_split(split, engine.backend.image_size, None, transform=domain.normaliser(), crop=0.5)
    given = engine.model_rows([{"image": image} for image in cells])
    assert engine.normalises_stain and all(torch.equal(row["pixels"], torch.from_numpy(pixels) / 255)
                                           for row, pixels in zip(given, cache))  # cropped once, as in training


def test_token_probabilities_and_text(tiny_blip_dir, cells):
    engine = CaptionEngine.from_dir(tiny_blip_dir, max_new_tokens=16)
    caption = engine.caption(cells[:1])[0]
    assert len(caption.token_probs) == len(caption.token_ids) <= 16
    assert all(0.0 < p <= 1.0 for p in caption.token_probs)
    assert caption.text == tidy(engine.backend.tokenizer.decode(caption.token_ids, skip_special_tokens=True))
    assert set(caption.attributes) == set(engine.schema.field_names)


def test_confidence_is_the_weakest_token_of_the_phrase(tiny_blip_dir):
    engine = CaptionEngine.from_dir(tiny_blip_dir)
    tokenizer = engine.backend.tokenizer
    ids = tokenizer("Neutrophil, large and round.", add_special_tokens=False)["input_ids"]
    probs = [0.9, 0.8, 0.7, 0.2, 0.95, 0.6][: len(ids)] + [0.99] * max(0, len(ids) - 6)
    caption = engine._caption(ids, [__import__("math").log(p) for p in probs])
    assert caption.attributes["cell_type"] == "Neutrophil" and caption.attributes["cell_size"] == "big"
    text, spans = engine._decode_with_spans(ids)
    expected = {}
    for name, phrase in (("cell_type", "Neutrophil"), ("cell_size", "large and round")):
        start = text.lower().index(phrase.lower())
        end = start + len(phrase)
        expected[name] = min(p for p, (a, b) in zip(probs, spans) if a < end and b > start)
    assert caption.confidences["cell_type"] == pytest.approx(expected["cell_type"])
    assert caption.confidences["cell_size"] == pytest.approx(expected["cell_size"])
    assert caption.confidences["cell_size"] == caption.confidences["cell_shape"]
    assert caption.confidences["granularity"] is None


def test_attributes_are_read_from_the_tidied_text_as_metrics_read_it(tiny_blip_dir):
    """WordPiece decodes "band-shaped" as "band - shaped", which a reader takes as a dash: a schema
    with no hyphen-aware readings (an older model's, a user's own) lost the nucleus shape there."""
    from hemcap.schema import build_schema, get_schema

    bare = build_schema({k: v for k, v in get_schema("wbcatt").raw.items() if k != "reading"}, source="test")
    engine = CaptionEngine.from_dir(tiny_blip_dir, schema=bare)
    ids = engine.backend.tokenizer("Neutrophil with a band-shaped nucleus; a low N:C ratio.",
                                   add_special_tokens=False)["input_ids"]
    caption = engine._caption(ids, [-0.1] * len(ids))
    assert caption.text == "Neutrophil with a band-shaped nucleus; a low N:C ratio."
    assert caption.attributes["nucleus_shape"] == "unsegmented-band"
    assert caption.attributes["nuclear_cytoplasmic_ratio"] == "low"
    assert caption.confidences["nucleus_shape"] == pytest.approx(__import__("math").exp(-0.1))
    text, spans = engine._decode_with_spans(ids)
    assert spans[-1][1] == len(text) and all(a <= b for a, b in spans)


def test_beam_search_and_empty_input(tiny_blip_dir, cells):
    engine = CaptionEngine.from_dir(tiny_blip_dir, max_new_tokens=12, num_beams=3)
    captions = engine.caption(cells[:2])
    assert len(captions) == 2 and all(0.0 < p <= 1.0 for c in captions for p in c.token_probs)
    assert engine.caption([]) == []


def test_settings_are_checked():
    with pytest.raises(ValueError, match="vision_chunk must be >= 1"):
        EngineSettings(vision_chunk=0)


def test_device_is_checked_and_used(tiny_blip_dir):
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        EngineSettings(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for CUDA, which this machine does not have"):
            EngineSettings(device="cuda")
    engine = CaptionEngine.from_dir(tiny_blip_dir, device="cpu")
    assert engine.backend.model.device.type == "cpu"
    auto = CaptionEngine.from_dir(tiny_blip_dir)
    assert auto.backend.model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_model_dir_without_a_model(tmp_path):
    from hemcap.models import ModelInfoError

    with pytest.raises(ModelInfoError, match=f"{tmp_path} is not a hemcap model folder: it has no hemcap_model.json"):
        CaptionEngine.from_dir(tmp_path)


def test_engine_decodes_as_the_model_info_says_unless_told_otherwise(tiny_blip_dir, tmp_path):
    import shutil

    from hemcap.models import read_model_info, write_model_info

    shutil.copytree(tiny_blip_dir, tmp_path / "m")
    info = read_model_info(tmp_path / "m")
    info.decoding = {"max_new_tokens": 7, "num_beams": 2, "decode_chunk": 3}
    write_model_info(tmp_path / "m", info)
    settings = CaptionEngine.from_dir(tmp_path / "m", num_beams=1).settings
    assert (settings.max_new_tokens, settings.num_beams, settings.decode_chunk) == (7, 1, 3)


def test_dihedral_views_are_the_eight_symmetries():
    from hemcap.engine import dihedral

    image = torch.arange(12.0).reshape(1, 3, 4)
    views = [dihedral(image, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) + tuple(v.shape) for v in views}) == 8
    from PIL import Image

    pil = Image.fromarray((torch.arange(12).reshape(3, 4).numpy() * 20).astype("uint8"))
    assert [dihedral(pil, k).size for k in range(8)] == [(4, 3), (3, 4)] * 2 + [(3, 4), (4, 3)] * 2


def test_tta_votes_per_attribute(tiny_blip_dir, cells):
    engine = CaptionEngine.from_dir(tiny_blip_dir, max_new_tokens=16, tta_views=4)
    captions = engine.caption(cells[:2])
    assert len(captions) == 2
    for caption in captions:
        assert set(caption.attributes) == set(engine.schema.field_names)
        stated = [n for n, v in caption.attributes.items() if v is not None]
        assert all(0.0 <= caption.confidences[n] <= 1.0 for n in stated)


def test_fast_decoding_matches_the_tokenizer(tiny_blip_dir):
    engine = CaptionEngine.from_dir(tiny_blip_dir)
    tokenizer = engine.backend.tokenizer
    ids = tokenizer(["Neutrophil, large and round, with a segmented nucleus.", "Band: low N:C ratio"],
                    add_special_tokens=False)["input_ids"]
    sequences = [row[: k + 1] for row in ids for k in range(len(row))] + [[tokenizer.sep_token_id, *ids[0]]]
    assert engine._decode_all(sequences) == tokenizer.batch_decode(sequences, skip_special_tokens=True)
