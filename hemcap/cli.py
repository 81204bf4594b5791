"""The ``hemcap`` command. It parses arguments and calls one library function per subcommand.

Each subcommand has an ``_add_<name>`` function that declares its arguments and sets
``run`` to a small function taking the parsed namespace. Library code never imports this module.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hemcap import __version__

log = logging.getLogger("hemcap")


class UserError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hemcap", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hemcap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.run(args) or 0)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as error:
        if args.verbose:
            raise
        print(f"hemcap {args.command}: error: {error}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------ subcommands


SUBCOMMANDS: list = []


def subcommand(add):
    SUBCOMMANDS.append(add)
    return add


@subcommand
def _add_quickstart(sub) -> None:
    quick = sub.add_parser("quickstart", help="run the whole toolkit offline on the built-in default")
    quick.add_argument("--data", choices=("synthetic", "wbcatt"), default="synthetic",
                       help="synthetic cells (offline default) or the real WBCAtt data")
    quick.add_argument("--data-dir", help="for --data wbcatt: folder with wbcatt/ and pbc/ (e.g. ../shared/data)")
    quick.add_argument("--runs-dir", default="runs", help="each run writes a new folder here")
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(run=_run_quickstart)


def _run_quickstart(args) -> int:
    from pathlib import Path

    from hemcap.quickstart import QuickstartOptions, run

    options = QuickstartOptions(args.data, Path(args.data_dir) if args.data_dir else None, Path(args.runs_dir), args.seed)
    for key, value in run(options).items():
        print(f"{key:>10}: {value}")
    return 0


@subcommand
def _add_prepare(sub) -> None:
    prepare = sub.add_parser("prepare", help="turn attribute annotations into a captioned dataset")
    recipes = prepare.add_subparsers(dest="recipe", required=True, metavar="RECIPE")

    wbcatt = _recipe_parser(recipes, "wbcatt", "WBCAtt CSVs + PBC images, official split")
    wbcatt.add_argument("--data-dir", required=True, help="folder holding wbcatt/ and pbc/ (e.g. ../shared/data)")
    wbcatt.set_defaults(run=lambda a: _run_recipe("prepare_wbcatt", a, data_dir=a.data_dir))

    leuk = _recipe_parser(recipes, "leukemiaattri", "LeukemiaAttri/LLD COCO boxes: crop and caption each cell")
    leuk.add_argument("--coco-json", required=True, nargs="+", metavar="[SPLIT=]PATH",
                      help="one file (split 80/10/10 by smear) or SPLIT=PATH per split")
    leuk.add_argument("--images", required=True, help="folder of the smear images")
    leuk.add_argument("--margin", type=float, default=0.25, help="context around each box, as a share of its side")
    leuk.add_argument("--crop-size", type=int, default=224, help="side of the square crops in pixels (0: keep)")
    leuk.set_defaults(run=lambda a: _run_recipe(
        "prepare_leukemiaattri", a, coco_json=_split_paths(a.coco_json), images_dir=a.images,
        margin=a.margin, crop_size=a.crop_size or None))

    table = _recipe_parser(recipes, "csv", "your own table: image path + one column per attribute")
    table.add_argument("--csv", required=True, help="the table (UTF-8 CSV with a header row)")
    table.add_argument("--schema", default="wbcatt", help="shipped schema name or path to a schema YAML")
    table.add_argument("--image-column", default="path", help="column with image paths")
    table.add_argument("--image-root", help="folder the image paths are relative to (default: the CSV's folder)")
    table.add_argument("--split-column", default="split", help="column naming train/val/test (else hash split)")
    table.add_argument("--id-column", help="column with a unique id per row (default: the image path)")
    table.set_defaults(run=lambda a: _run_recipe(
        "prepare_csv", a, csv_path=a.csv, schema=a.schema, image_column=a.image_column,
        image_root=a.image_root, split_column=a.split_column, id_column=a.id_column))

    synth = _recipe_parser(recipes, "synthetic", "procedural cells with known attributes (offline default)")
    synth.add_argument("--n-train", type=int, default=600)
    synth.add_argument("--n-val", type=int, default=100)
    synth.add_argument("--n-test", type=int, default=200)
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.set_defaults(run=lambda a: _run_recipe(
        "prepare_synthetic", a, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, size=a.size))


def _recipe_parser(recipes, name: str, help: str):
    parser = recipes.add_parser(name, help=help, description=help)
    parser.add_argument("--out", required=True, help="dataset folder to write (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--paraphrases", type=int, default=4, help="paraphrased captions per image, besides the templates")
    parser.add_argument("--seed", type=int, default=0, help="seed for paraphrases (and synthetic images)")
    parser.add_argument("--convert-images", action="store_true",
                        help="convert grayscale/alpha/16-bit/CMYK images to 8-bit RGB instead of refusing them")
    return parser


def _split_paths(items: list[str]) -> dict | str:
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    pairs = [item.split("=", 1) for item in items]
    bad = [item for item, pair in zip(items, pairs) if len(pair) != 2]
    if bad:
        raise UserError(f"--coco-json: give SPLIT=PATH for each file when there are several (got {bad})")
    return {split: path for split, path in pairs}


def _run_recipe(function: str, args, **kwargs) -> int:
    from hemcap import recipes

    common = dict(overwrite=args.overwrite, n_paraphrases=args.paraphrases, seed=args.seed)
    if function != "prepare_synthetic":
        common["convert_images"] = args.convert_images
    out = getattr(recipes, function)(out_dir=args.out, **kwargs, **common)
    dataset, _ = recipes.load_prepared(out)
    print(f"wrote {out}: " + ", ".join(f"{split} {len(dataset[split])}" for split in dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
