"""Captioning speed: the naive loop against hemcap's engine, on the same model and images.

Naive is one ``model.generate`` per image, as in the HF BLIP notebook. The engine encodes
images in small vision chunks and decodes many at once. Both generate exactly ``--tokens`` new
tokens (min = max), greedy; the script checks that their token ids are identical and prints
the ratio. Models have random weights (no download): ``base`` is BLIP-base's architecture at
384 px, ``small`` is ``configs/blip_small_scratch.yaml``'s. (Scoring speed: eval/bench_scoring.py.)

    python eval/bench_captioning.py --size base --images 8
    python eval/bench_captioning.py --size small --images 256 --vision-chunk 16 --decode-chunk 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from hemcap.captions import caption_variants
from hemcap.engine import CaptionEngine, EngineSettings
from hemcap.synthetic import make_cells

ROOT = Path(__file__).resolve().parents[1]


def build_model(size: str, out: Path) -> Path:
    from hemcap.config import ModelConfig, load_config
    from hemcap.models import load_backend

    captions = [c for _, a in make_cells(50, seed=1, size=32) for c in caption_variants(a, n_paraphrases=2)]
    if size == "base":  # BlipConfig's defaults are BLIP-base: ViT-B/16 at 384 px, 12-layer BERT decoder
        cfg = ModelConfig(backend="blip", init="scratch", vocab_size=30524,
                          vision_config={"image_size": 384}, text_config={})
    else:
        cfg = load_config(ROOT / "configs" / "blip_small_scratch.yaml").model
    return load_backend(cfg, captions=captions).save(out)


def naive(engine: CaptionEngine, images, tokens: int) -> tuple[float, list[list[int]]]:
    backend = engine.backend
    started = time.perf_counter()
    out = []
    with torch.inference_mode():
        for image in images:
            ids = backend.model.generate(pixel_values=backend.pixel_values([{"image": image}]).to(backend.model.device),
                                         max_new_tokens=tokens, min_new_tokens=tokens)
            out.append(ids[0, 1:].tolist())
    return time.perf_counter() - started, out


def engine_run(engine: CaptionEngine, images) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    captions = engine.caption(images)
    return time.perf_counter() - started, [c.token_ids for c in captions]


def bench_speed(args) -> None:
    images = [im for im, _ in make_cells(args.images, seed=2, size=128)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.size, Path(tmp))
        settings = EngineSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                  vision_chunk=args.vision_chunk, decode_chunk=args.decode_chunk)
        engine = CaptionEngine.from_dir(model_dir, **vars(settings))
        engine.caption(images[:2])  # warm-up: first calls allocate
        t_engine, ids_engine = engine_run(engine, images)
        t_naive, ids_naive = naive(engine, images, args.tokens)
    n = len(images)
    same = sum(a == b for a, b in zip(ids_engine, ids_naive))
    print(f"model: {args.size} (random init), {n} images, {args.tokens} new tokens, threads {torch.get_num_threads()}")
    print(f"engine settings: vision_chunk={args.vision_chunk or engine.backend.vision_chunk()} decode_chunk={args.decode_chunk}")
    print(f"naive : {t_naive:.2f} s  ({t_naive / n:.3f} s/image)")
    print(f"engine: {t_engine:.2f} s  ({t_engine / n:.3f} s/image)")
    print(f"identical greedy token ids: {same}/{n}")
    print(f"speed-up: {t_naive / t_engine:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("base", "small"), default="small")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--vision-chunk", type=int, default=None, help="default: the backend's choice")
    parser.add_argument("--decode-chunk", type=int, default=EngineSettings.decode_chunk)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bench_speed(args)


if __name__ == "__main__":
    main()
