"""The convolutional stem's forward and backward with its input contiguous against channels-last.

``hemcap.models.stem.ConvStem`` hands its convolutions a channels-last input: oneDNN's NHWC kernels
are faster on CPUs, most of all in fp32 (a machine without native bf16). This times the stem alone,
a batch of the shipped recipe's size (``--batch`` images at ``--size`` px, the stride-2 widths
``spec_for`` gives), forward and backward, both layouts alternating within each round in one
process (odd rounds reversed); the table gives the median seconds per pass.

    python eval/bench_stem_layout.py                  # 256 px, fp32, 6 rounds of 3 passes, ~1 min
    python eval/bench_stem_layout.py --size 128 --bf16

Target: channels-last is not slower (the stem keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from types import SimpleNamespace

import torch

from hemcap.models.stem import ConvStem, spec_for

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def one_pass(stem: ConvStem, pixels: torch.Tensor, bf16: bool) -> None:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        out = stem.layers(pixels)  # the layers themselves: forward() would make every input channels-last
    out.float().square().mean().backward()
    stem.zero_grad(set_to_none=True)


def measure(args) -> dict[str, list[float]]:
    torch.manual_seed(0)
    tower = SimpleNamespace(patch_size=args.size // 8, hidden_size=256)  # the recipe's 8x8 grid, width 256
    stem = ConvStem(256, spec_for(tower)["widths"])
    pixels = torch.randn(args.batch, 3, args.size, args.size)
    inputs = {name: pixels.contiguous(memory_format=fmt) for name, fmt in LAYOUTS.items()}
    for name in LAYOUTS:
        one_pass(stem, inputs[name], args.bf16)  # first-call allocations and kernel choice
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for round_ in range(args.rounds):
        for name in list(LAYOUTS)[::-1] if round_ % 2 else LAYOUTS:
            started = time.perf_counter()
            for _ in range(args.passes):
                one_pass(stem, inputs[name], args.bf16)
            seconds[name].append((time.perf_counter() - started) / args.passes)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="input px (patch 32 at 256, 16 at 128: an 8x8 grid)")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--passes", type=int, default=3, help="timed passes per layout per round")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast (fast only with native bf16)")
    args = parser.parse_args()
    seconds = measure(args)
    medians = {name: statistics.median(figures) for name, figures in seconds.items()}
    print(f"stem at {args.size} px, batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads")
    for name, figures in seconds.items():
        print(f"  {name:<14} " + " ".join(f"{f:.3f}" for f in figures) + f"  median {medians[name]:.3f} s")
    ratio = medians["contiguous"] / medians["channels-last"]
    print(f"channels-last is {ratio:.2f}x as fast: target {'met' if ratio >= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
