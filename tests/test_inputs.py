"""Training inputs: decode once (bad images skipped), memory-mapped, batches fixed by step and
prefetched, cell-safe augmentations."""

import io
import logging
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from hemcap.config import AugmentConfig
from hemcap.inputs import Prefetcher, TrainBatches, augment_pixels, decode_split, gather_rows, map_split, zoom


def png(colour, size=(20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def split():
    import datasets

    images = [{"bytes": png((255, 0, 0)), "path": None}, {"bytes": b"not an image", "path": None},
              {"bytes": png((0, 0, 255)), "path": None}]
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    return datasets.Dataset.from_dict({"id": ["a", "broken", "c"], "image": images}, features=features)


def test_decode_resizes_once_skips_bad_images_and_caches(split, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        pixels, rows = decode_split(split, (16, 8), tmp_path)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 16, 8)
    assert rows == [0, 2]
    assert "id broken" in caplog.text
    assert pixels[0, 0].float().mean() > 250 and pixels[1, 2].float().mean() > 250  # red, then blue
    assert len(list(tmp_path.glob("pixels-*-16x8.npy"))) == 1
    again, rows_again = decode_split(split, (16, 8), tmp_path)
    assert torch.equal(again, pixels) and rows_again == rows


def test_a_centre_crop_is_decoded_as_captioning_crops_and_cached_apart(split, tmp_path):
    from hemcap.images import model_pixels

    whole, _ = decode_split(split, (16, 8), tmp_path)
    cropped, rows = decode_split(split, (16, 8), tmp_path, crop=0.5)
    image = Image.open(io.BytesIO(png((255, 0, 0))))  # the split's first image
    assert np.array_equal(cropped[0].numpy(), model_pixels(image, (16, 8), crop=0.5)) and rows == [0, 2]
    assert len(list(tmp_path.glob("pixels-*-16x8.npy"))) == 2  # a cache of its own beside the whole images'


def test_decode_reads_only_the_image_formats_of_hemcap_images(tmp_path, caplog):
    """A GIF decodes in Pillow but is not one of ours: the row is skipped, as an EPS would be
    (Pillow's EPS reader runs Ghostscript on the file)."""
    import datasets

    gif = io.BytesIO()
    Image.new("RGB", (20, 10), (0, 255, 0)).save(gif, format="GIF")
    images = [{"bytes": png((255, 0, 0)), "path": None}, {"bytes": gif.getvalue(), "path": None}]
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    split = datasets.Dataset.from_dict({"id": ["png", "gif"], "image": images}, features=features)
    with caplog.at_level(logging.WARNING):
        _, rows = decode_split(split, (16, 8), None)
    assert rows == [0] and "id gif" in caplog.text and "UnidentifiedImageError" in caplog.text


def test_the_cache_is_memory_mapped_not_read_into_memory(split, tmp_path):
    first, rows = map_split(split, (16, 8), tmp_path)
    again, rows_again = map_split(split, (16, 8), tmp_path)
    tensor, _ = decode_split(split, (16, 8), tmp_path)
    assert isinstance(first, np.memmap) and isinstance(again, np.memmap) and rows == rows_again == [0, 2]
    assert first.shape == (2, 3, 16, 8) and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    cache = next(tmp_path.glob("pixels-*-16x8.npy"))
    with open(cache, "r+b") as f:  # a write to the file shows through every mapping: nothing was copied
        f.seek(first.offset)  # the first row, after the .npy header
        f.write(bytes([7]) * 3 * 16 * 8)
    assert (first[0] == 7).all() and (again[0] == 7).all() and (tensor[0] == 7).all()
    in_memory, rows_in_memory = map_split(split, (16, 8), None)
    assert not isinstance(in_memory, np.memmap) and rows_in_memory == rows
    assert np.array_equal(in_memory[1], first[1])


def make_batches(n=10, batch=4, seed=0, rank=0, world=1, **augment):
    pixels = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    captions = [[f"canonical {i}", f"variant {i}"] for i in range(n)]
    return TrainBatches(pixels, captions, batch, AugmentConfig(**augment), seed, variants=True, rank=rank, world=world)


def test_a_step_always_gets_the_same_batch():
    first, second = make_batches(), make_batches()
    for step in (0, 3, 1, 7):
        a, b = first(step), second(step)
        assert a.rows == b.rows and a.captions == b.captions and torch.equal(a.pixels, b.pixels)
    assert make_batches(seed=1)(0).rows != first(0).rows or make_batches(seed=1)(1).rows != first(1).rows


def test_each_epoch_visits_each_image_at_most_once():
    batches = make_batches(n=10, batch=3)
    assert batches.steps_per_epoch == 3  # the last incomplete batch is dropped
    seen = [r for step in range(3) for r in batches(step).rows]
    assert len(seen) == len(set(seen)) == 9
    assert [r for step in range(3, 6) for r in batches(step).rows] != seen  # a new order next epoch


def test_restained_copies_reach_about_half_a_batch_and_the_same_ones_every_time():
    n = 40
    pixels = torch.zeros((n, 3, 4, 4), dtype=torch.uint8)
    copies = [torch.full((n, 3, 4, 4), 100 + k, dtype=torch.uint8) for k in range(2)]
    captions = [[f"cell {i}"] for i in range(n)]

    def first_pixels() -> torch.Tensor:
        batches = TrainBatches(pixels, captions, n, AugmentConfig(rotate90=False, flip=False), 0, False,
                               restained=copies)
        return (batches(0).pixels[:, 0, 0, 0] * 255).round()

    values = first_pixels()
    assert torch.equal(values, first_pixels())
    counts = [int((values == v).sum()) for v in (0, 100, 101)]
    assert sum(counts) == n and 12 <= counts[0] <= 28 and min(counts[1:]) >= 3  # each image: own, p = 0.5


def test_processes_take_disjoint_slices_of_one_global_batch():
    ranks = [make_batches(n=12, batch=2, rank=r, world=3) for r in range(3)]
    rows = [r for b in ranks for r in b(0).rows]
    assert len(rows) == len(set(rows)) == 6
    assert ranks[0].steps_per_epoch == 2


def test_symmetries_move_pixels_without_changing_them():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = augment_pixels(pixels, AugmentConfig(rotate90=True, flip=True), generator)
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    for before, after in zip(pixels, out):
        assert torch.equal(torch.sort(before.flatten().float() / 255).values, torch.sort(after.flatten()).values)
    assert not torch.equal(out, pixels.float() / 255)


def test_colour_and_stain_jitter_stay_in_range_and_change_colour():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    out = augment_pixels(pixels, AugmentConfig(rotate90=False, flip=False, color_jitter=0.2, stain_jitter=0.2),
                         generator)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - pixels.float() / 255).abs().mean() > 0.01


def test_variants_are_drawn_per_step():
    batches = make_batches(n=8, batch=8)
    picked = {c for step in range(6) for c in batches(step).captions}
    assert any(c.startswith("canonical") for c in picked) and any(c.startswith("variant") for c in picked)
    assert np.all([c.split()[1] == str(r) for c, r in zip(batches(0).captions, batches(0).rows)])


def mapped_pixels(tmp_path, n=10) -> np.memmap:
    pixels = np.random.default_rng(0).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    return np.load(tmp_path / "pixels.npy", mmap_mode="r")


def test_batches_from_a_memory_map_equal_batches_from_memory(tmp_path):
    mapped = mapped_pixels(tmp_path)
    assert torch.equal(gather_rows(mapped, [7, 2, 5]), torch.from_numpy(np.array(mapped))[[7, 2, 5]])
    captions = [[f"canonical {i}", f"variant {i}"] for i in range(10)]
    augment = AugmentConfig(color_jitter=0.2, stain_jitter=0.2)
    from_map = TrainBatches(mapped, captions, 4, augment, seed=3, variants=True)
    from_memory = TrainBatches(torch.from_numpy(np.array(mapped)), captions, 4, augment, seed=3, variants=True)
    for step in (0, 1, 5, 2):
        a, b = from_map(step), from_memory(step)
        assert a.rows == b.rows and a.captions == b.captions and torch.equal(a.pixels, b.pixels)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_batch_leaves_no_pages_of_the_cache_resident(tmp_path):
    mapped = mapped_pixels(tmp_path, n=64)
    gather_rows(mapped, list(range(0, 64, 2)))
    smaps = open("/proc/self/smaps").read().split(str(tmp_path / "pixels.npy"))[1]
    assert next(line for line in smaps.splitlines() if line.startswith("Rss:")).split()[1] == "0"


@pytest.mark.parametrize("ahead", [2, 0], ids=["thread", "no-thread"])
def test_prefetched_batches_equal_directly_built_ones(ahead):
    direct, background = make_batches(n=12, batch=3, seed=4), make_batches(n=12, batch=3, seed=4)
    with Prefetcher(background, ahead=ahead) as prefetch:
        for step in (0, 1, 2, 3, 9, 10, 4):  # 9 and 4 jump: the thread restarts there
            a, b = direct(step), prefetch(step)
            assert a.rows == b.rows and a.captions == b.captions and torch.equal(a.pixels, b.pixels)
    assert Prefetcher(lambda step: threading.current_thread(), ahead=0)(0) is threading.current_thread()


def test_an_exception_in_the_prefetch_thread_is_raised_in_the_caller():
    def build(step):
        if step == 3:
            raise ValueError(f"bad image at step {step}")
        return step

    prefetch = Prefetcher(build)
    assert [prefetch(s) for s in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad image at step 3"):
        prefetch(3)
    assert not prefetch_threads()
    assert prefetch(4) == 4  # a later call starts afresh
    prefetch.close()


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hemcap-prefetch"]


def test_the_prefetch_thread_ends_on_close_even_with_a_full_queue():
    prefetch = Prefetcher(lambda step: step, ahead=2)
    assert prefetch(0) == 0
    threads = prefetch_threads()
    assert len(threads) == 1
    threads[0].join(timeout=0.5)  # it fills the queue and waits for room
    assert threads[0].is_alive()
    prefetch.close()
    assert not threads[0].is_alive() and not prefetch_threads()



def test_a_one_thread_prefetcher_leaves_the_callers_torch_threads_alone():
    before = torch.get_num_threads()
    with Prefetcher(lambda step: torch.get_num_threads(), threads=1) as prefetch:
        assert [prefetch(step) for step in range(3)] == [1, 1, 1]
    assert torch.get_num_threads() == before
    with Prefetcher(lambda step: torch.get_num_threads()) as prefetch:
        assert prefetch(0) == before


# ------------------------------------------------------------------------------ other labs' optics and cameras

CAMERA = {"scale": 0.15, "blur": 1.0, "gamma": 0.2, "noise": 0.03, "jpeg_quality": 60, "stain_mix": 0.2}


def smooth_images(n=16, size=32, seed=0, grain=55) -> torch.Tensor:
    """uint8 images with smooth structure (like cells on a background) and ``grain`` levels of pixel noise."""
    noise = torch.rand(n, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    coarse = torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    fine = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return (coarse * 200 + fine * grain).to(torch.uint8)


def augmented(pixels, seed=0, **fields) -> torch.Tensor:
    cfg = AugmentConfig(rotate90=False, flip=False, **fields)
    return augment_pixels(pixels, cfg, torch.Generator().manual_seed(seed))


def test_with_the_new_augmentations_off_the_batch_is_what_it_was():
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cfg = AugmentConfig(color_jitter=0.2, stain_jitter=0.2, scale=0.0, blur=0.0, gamma=0.0, noise=0.0,
                        jpeg_quality=None)
    out = augment_pixels(pixels, cfg, torch.Generator().manual_seed(0))
    assert out.sum().item() == pytest.approx(341.96994, abs=1e-3)  # the figures before these augmentations
    assert out[:, 0, 2, 5].tolist() == pytest.approx([0.5804721, 0.3044115, 0.5751486, 0.3069597], abs=1e-6)


@pytest.mark.parametrize("name", sorted(CAMERA))
def test_each_camera_augmentation_changes_about_half_a_batch_in_range(name):
    pixels = smooth_images()
    changed = 0
    for seed in range(4):
        before, after = augmented(pixels, seed), augmented(pixels, seed, **{name: CAMERA[name]})
        assert after.shape == pixels.shape and after.dtype == torch.float32
        assert after.min() >= 0 and after.max() <= 1
        changed += sum(not torch.equal(a, b) for a, b in zip(before, after))  # the others are left exactly
    assert 20 <= changed <= 44, changed  # of 64 images; p = 0.5


def test_the_same_seed_gives_the_same_batch():
    pixels = smooth_images()
    fields = {**CAMERA, "color_jitter": 0.1, "stain_jitter": 0.1}
    assert torch.equal(augmented(pixels, 3, **fields), augmented(pixels, 3, **fields))
    assert not torch.equal(augmented(pixels, 3, **fields), augmented(pixels, 4, **fields))


def changed_only(pixels, seed=0, **fields) -> tuple[torch.Tensor, torch.Tensor]:
    """(before, after) of the images an augmentation touched."""
    before, after = augmented(pixels, seed), augmented(pixels, seed, **fields)
    touched = (before != after).flatten(1).any(1)
    assert touched.any()
    return before[touched], after[touched]


def mean_abs_laplacian(x: torch.Tensor) -> float:
    laplacian = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return laplacian.abs().mean().item()


def test_blur_lowers_high_frequency_energy():
    before, after = changed_only(smooth_images(), blur=2.0)
    assert mean_abs_laplacian(after) < 0.8 * mean_abs_laplacian(before)
    assert (after.mean(dim=(2, 3)) - before.mean(dim=(2, 3))).abs().max() < 0.01  # the colour is kept


DISC, BACKGROUND = torch.tensor([120, 60, 140]).view(3, 1, 1), torch.tensor([230, 220, 225]).view(3, 1, 1)


def disc(n=16, size=128, radius=30) -> torch.Tensor:
    """A dark centred disc (a cell) on a light background, its edge antialiased over a pixel."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside = (radius + 0.5 - ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()).clamp(0, 1)
    return (BACKGROUND + (DISC - BACKGROUND) * inside).round().to(torch.uint8).expand(n, 3, size, size).contiguous()


def disc_radius_and_centre(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Radius (from the area) and centre of the dark disc, weighted by darkness: sub-pixel."""
    darkness = ((x[:, 1] - 220 / 255) / ((60 - 220) / 255)).clamp(0, 1)
    area, coords = darkness.sum((1, 2)), torch.arange(x.shape[-1]) + 0.5
    centre_y, centre_x = (darkness.sum(2) * coords).sum(1) / area, (darkness.sum(1) * coords).sum(1) / area
    return (area / torch.pi).sqrt(), centre_y, centre_x


def test_zoom_scales_a_centred_disc_about_the_centre_and_pads_with_background():
    x = disc(n=3).float() / 255
    out = zoom(x, torch.tensor([0.85, 1.0, 1.15]))
    radius, centre_y, centre_x = disc_radius_and_centre(out)
    assert (radius / disc_radius_and_centre(x)[0]).tolist() == pytest.approx([0.85, 1.0, 1.15], abs=0.005)
    assert ((centre_y - 64).abs() < 0.05).all() and ((centre_x - 64).abs() < 0.05).all()
    assert torch.allclose(out[1], x[1], atol=1e-6)  # a factor of 1 samples every pixel at its centre
    assert (out[0, :, :3, :] - BACKGROUND / 255).abs().max() < 1e-5  # the frame a shrink adds is background


def test_scale_keeps_a_centred_disc_centred_and_changes_its_size_by_at_most_the_scale():
    pixels = disc()
    radius, centre_y, centre_x = disc_radius_and_centre(augmented(pixels, 1, scale=0.15))
    ratios = radius / disc_radius_and_centre(pixels.float() / 255)[0]
    assert ((centre_y - 64).abs() < 0.05).all() and ((centre_x - 64).abs() < 0.05).all()
    assert ((ratios > 0.85 - 0.005) & (ratios < 1.15 + 0.005)).all(), ratios
    assert 4 <= ((ratios - 1).abs() > 1e-3).sum() <= 12 and (ratios > 1.01).any() and (ratios < 0.99).any()


def test_jpeg_changes_the_images_a_little():
    before, after = changed_only(smooth_images(size=64, grain=10), jpeg_quality=60)
    difference = (after - before).abs().mean().item()
    assert 0.001 < difference < 0.05


def test_noise_raises_the_variance_of_a_flat_image():
    flat = torch.full((16, 3, 32, 32), 128, dtype=torch.uint8)
    _, after = changed_only(flat, noise=0.05)
    std = after.flatten(1).std(1)
    assert (std > 0).all() and std.max() < 0.06
    assert (after.flatten(1).mean(1) - 128 / 255).abs().max() < 0.01  # zero-mean noise


def test_gamma_keeps_black_and_white_and_bends_the_middle():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(16, 3, 4, 3).contiguous()
    _, after = changed_only(pixels, gamma=0.2)
    assert (after[..., 0] == 0).all() and (after[..., 2] == 1).all()
    middle = after[:, 0, 0, 1]
    assert ((middle >= (128 / 255) ** 1.2215) & (middle <= (128 / 255) ** 0.8187)).all()


def test_stain_mix_changes_hues_and_keeps_the_background():
    from hemcap.inputs import stain_mix

    x = torch.full((2, 3, 16, 16), 0.9)
    x[:, :, 4:8, 4:8] = torch.tensor([0.4, 0.2, 0.6]).view(3, 1, 1)  # a purple nucleus on the slide
    offsets = torch.zeros(2, 3, 3)
    offsets[1, 0, 1] = 0.3  # red absorbs a little where green does
    out = stain_mix(x.clone(), offsets)
    assert torch.allclose(out[0], x[0], atol=1e-5)  # the identity mixing leaves the image alone
    assert torch.allclose(out[1, :, 0, 0], x[1, :, 0, 0], atol=1e-5)  # the background keeps its colour
    assert out[1, 0, 5, 5] < x[1, 0, 5, 5] and torch.allclose(out[1, 1:, 5, 5], x[1, 1:, 5, 5], atol=1e-5)
