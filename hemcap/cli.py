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
    quick.add_argument("--max-minutes", type=float, help="training time budget (default: the config's)")
    quick.set_defaults(run=_run_quickstart)


def _run_quickstart(args) -> int:
    from pathlib import Path

    from hemcap.quickstart import QuickstartOptions, run

    options = QuickstartOptions(args.data, Path(args.data_dir) if args.data_dir else None, Path(args.runs_dir),
                                args.seed, args.max_minutes)
    summary = run(options)
    width = max(map(len, summary))
    print("\nhemcap quickstart: done")
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
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
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="follow image paths that leave the image folder (absolute or ../); refused by default")
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
        common.update(convert_images=args.convert_images, allow_outside_root=args.allow_outside_root)
    out = getattr(recipes, function)(out_dir=args.out, **kwargs, **common)
    dataset, _ = recipes.load_prepared(out)
    print(f"wrote {out}: " + ", ".join(f"{split} {len(dataset[split])}" for split in dataset))
    return 0


@subcommand
def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="caption a dataset split with a model, then score and report it")
    ev.add_argument("--model", required=True, help="model dir written by `hemcap train` (model or LoRA adapter)")
    ev.add_argument("--data", required=True, help="dataset dir written by `hemcap prepare`")
    ev.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ev.add_argument("--out", required=True, help="report folder: predictions.jsonl, metrics.json, report.md, plots")
    ev.add_argument("--limit", type=int, help="evaluate only the first N rows")
    ev.add_argument("--reannotations", help="WBCAtt re-annotation CSV, for the human agreement ceiling")
    ev.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java; about 25 s per 3,000 captions)")
    ev.add_argument("--num-beams", type=int, help="1: greedy decoding (default: as the model's validation)")
    _add_decoding(ev)
    ev.add_argument("--tta-views", type=int, choices=(1, 2, 4, 8),
                    help="caption rotated/flipped views and vote each attribute (default: as validation, 1)")
    _add_device(ev)
    _add_threads(ev)
    ev.add_argument("--look", action="append", metavar="DIR",
                    help="a folder of another lab's smears: also score the split re-rendered in their colours and "
                         "magnification (hemcap.looks; repeat for several)")
    ev.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ev.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from pathlib import Path

    from hemcap.evaluation import EvalOptions, evaluate

    options = EvalOptions(
        model_dir=Path(args.model), data_dir=Path(args.data), out_dir=Path(args.out), split=args.split,
        limit=args.limit, reannotations=Path(args.reannotations) if args.reannotations else None,
        meteor=False if args.no_meteor else None, overwrite=args.overwrite,
        looks=tuple(Path(folder) for folder in args.look or ()))
    _use_threads(args)
    metrics = evaluate(options, _engine_options(args))
    print(f"{metrics['n']} captions; {_headline(metrics)}")
    if options.looks:
        print((Path(args.out) / "looks.md").read_text(encoding="utf-8"))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _headline(metrics: dict) -> str:
    """Mean attribute accuracy, the first target's accuracy, CIDEr-D and BLEU-4, in one line."""
    faith, caption = metrics["faithfulness"], metrics["caption"]
    target = faith["targets"][0]
    return (f"mean attribute accuracy {faith['attribute_mean']['accuracy']:.1%}, "
            f"{target.replace('_', ' ')} {faith['fields'][target]['accuracy']:.1%}, "
            f"CIDEr-D {caption['cider_d']:.3f}, BLEU-4 {caption['bleu_4']:.3f}")


def _add_images_model_out(parser, out_help: str) -> None:
    """The images, the captioner and the output folder of a command that captions folders of images."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="trained model dir (hemcap train's output, e.g. runs/x/model)")
    parser.add_argument("--out", required=True, help=out_help)


def _add_decoding(parser) -> None:
    """The decoding settings a command may change; the model's info has the rest (``_engine_options``)."""
    parser.add_argument("--batch", type=int, help="images decoded together (default: as the model's validation)")
    parser.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (default: as validation)")
    parser.add_argument("--no-stain-norm", dest="stain_norm", action="store_false", default=None,
                        help="give the model each image's own colours (default: moved to the training images' "
                             "colours, when the model records them)")


def _add_device(parser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the first GPU if there is one, else the CPU)")


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=int, help="CPU threads (default: the cores no other process keeps busy now)")


def _use_threads(args) -> None:
    """``--threads``, else the free cores (hemcap.threads), before any model runs."""
    from hemcap.threads import choose_threads, local_processes, use_threads

    use_threads(choose_threads(args.threads, local_processes()))


def _engine_options(args) -> dict:
    """The decoding flags given (``--batch``, ``--device``, ...) as engine settings; the model's info has the rest."""
    options = {"decode_chunk": args.batch, "device": args.device, "max_new_tokens": args.max_new_tokens,
               "num_beams": getattr(args, "num_beams", None), "tta_views": getattr(args, "tta_views", None),
               "stain_norm": args.stain_norm}
    return {name: value for name, value in options.items() if value is not None}  # --batch 0 meets the engine's check


@subcommand
def _add_score(sub) -> None:
    score = sub.add_parser("score", help="recompute every metric from a predictions.jsonl file",
                           description="Recompute caption and faithfulness metrics from predictions.jsonl alone "
                                       "and write metrics.json, report.md and plots.")
    score.add_argument("predictions", help="predictions.jsonl (format: hemcap.metrics docstring)")
    score.add_argument("--out", help="report folder (default: the predictions file's folder)")
    score.add_argument("--schema", help="for a lab's own schema: its YAML, or the model folder whose info embeds it "
                                        "(default: the shipped schema the lines name)")
    score.add_argument("--train-labels", help="training labels for the majority baseline: an annotation CSV or a "
                                              "prepared dataset folder (default: the references)")
    score.add_argument("--reannotations", help="second-annotator CSV for the human ceiling "
                                               "(e.g. ../shared/data/wbcatt/pbc_attr_reannotations.csv)")
    score.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java and takes ~25 s per 3k)")
    score.add_argument("--bertscore-model", help="local model folder for BERTScore (needs the bert-score package)")
    score.add_argument("--examples", type=int, default=5, help="best, worst and random example captions to show")
    score.add_argument("--seed", type=int, default=0, help="seed for the random examples")
    score.add_argument("--no-plots", action="store_true", help="write metrics.json and report.md only")
    score.set_defaults(run=_run_score)


def _run_score(args) -> int:
    from pathlib import Path

    from hemcap.metrics import score_predictions
    from hemcap.report import write_report

    metrics = score_predictions(
        args.predictions, baseline_labels=args.train_labels, reannotations=args.reannotations,
        meteor=False if args.no_meteor else None, bertscore_model=args.bertscore_model,
        n_examples=args.examples, seed=args.seed, schema=_schema_arg(args.schema),
    )
    out = write_report(metrics, args.out or Path(args.predictions).parent, plots=not args.no_plots)
    print(_headline(metrics))
    print(f"wrote {out / 'report.md'}")
    return 0


def _schema_arg(value: str | None):
    """``--schema``: a model folder (its info embeds the schema), a shipped name, or a YAML path."""
    from hemcap.models import is_model_dir, read_model_info
    from hemcap.schema import get_schema

    if value is None:
        return None
    return read_model_info(value).schema_object() if is_model_dir(value) else get_schema(value)


@subcommand
def _add_compare(sub) -> None:
    compare = sub.add_parser("compare", help="set eval reports side by side (markdown, CSV, bar plot)")
    compare.add_argument("reports", nargs="+", metavar="REPORT_DIR", help="folders holding metrics.json")
    compare.add_argument("--out", required=True, help="folder for comparison.md, comparison.csv and the plot")
    compare.add_argument("--labels", nargs="+", help="one column label per report (default: model name or folder)")
    compare.set_defaults(run=_run_compare)


def _run_compare(args) -> int:
    from hemcap.report import compare_reports

    out = compare_reports(args.reports, args.out, labels=args.labels)
    print(f"wrote {out / 'comparison.md'}, comparison.csv, comparison_accuracy.png")
    return 0


@subcommand
def _add_train(sub) -> None:
    from hemcap.config import add_train_arguments

    train = sub.add_parser("train", help="fine-tune a captioning model (full or LoRA) on a prepared dataset",
                           description="Fine-tune a captioning model. The same code runs under "
                                       "`accelerate launch hemcap/train.py ...` on one or many GPUs.")
    add_train_arguments(train)
    train.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from hemcap.config import config_from_args
    from hemcap.train import fit

    print(f"model written to {fit(config_from_args(args))}")
    return 0


@subcommand
def _add_refine(sub) -> None:
    refine = sub.add_parser("refine", help="fit a trained model's refiner: chosen fields re-decided from its "
                                           "attribute heads and the nucleus geometry (hemcap.refine)")
    refine.add_argument("--model", required=True, help="trained model dir with attribute heads (e.g. runs/x/model)")
    refine.add_argument("--data", required=True, help="the prepared dataset it was trained on (its train split is read)")
    refine.add_argument("--fields", nargs="+", required=True, help="fields to refine, e.g. nucleus_shape")
    refine.add_argument("--cells", type=int, default=None, help="training cells to measure, evenly spaced (default 1500)")
    refine.add_argument("--val-split", default="val", help="split the refiner is scored on, beside the captions")
    refine.set_defaults(run=_run_refine)


def _run_refine(args) -> int:
    from hemcap.refine import CELLS, fit_refiner

    spec = fit_refiner(args.model, args.data, args.fields, args.cells or CELLS, val_split=args.val_split)
    print(f"refiner for {', '.join(spec['fields'])} fitted on {spec['cells']} cells, written to {args.model}")
    for name, scores in (spec["validation"] or {}).items():
        captions = "" if scores["captions"] is None else f" (the captions: {scores['captions']:.3f})"
        print(f"  {name}: {scores['refiner']:.3f} right on {args.val_split}{captions}")
    return 0


@subcommand
def _add_export(sub) -> None:
    export = sub.add_parser("export", help="write a standalone model from a LoRA adapter (--merge)")
    export.add_argument("model_dir", help="trained model dir holding a LoRA adapter (e.g. runs/x/model)")
    export.add_argument("--merge", action="store_true", required=True, help="merge the adapter into its base")
    export.add_argument("--out", required=True, help="dir to write the merged model to")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from hemcap.hub import export_merged

    print(f"merged model written to {export_merged(args.model_dir, args.out, overwrite=args.overwrite)}")
    return 0


@subcommand
def _add_push(sub) -> None:
    push = sub.add_parser("push", help="upload a trained model, its processor and a model card to the Hub")
    push.add_argument("model_dir", help="trained model dir (e.g. runs/x/model)")
    push.add_argument("--repo-id", required=True, help="user/name on the Hugging Face Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--dry-run", action="store_true", help="only write the folder that would be uploaded")
    push.add_argument("--out", help="with --dry-run: a new folder to write it to (default: <model_dir>-hub-upload)")
    push.add_argument("--overwrite", action="store_true",
                      help="with --dry-run: replace --out if an earlier dry run wrote it (never any other folder)")
    push.add_argument("--license", help="license id for the card (default: the base model's, else apache-2.0)")
    push.set_defaults(run=_run_push)


def _run_push(args) -> int:
    from hemcap.hub import push

    where = push(args.model_dir, args.repo_id, private=args.private, dry_run=args.dry_run, out=args.out,
                 license=args.license, overwrite=args.overwrite)
    print(f"{'would upload' if args.dry_run else 'uploaded to'}: {where}")
    return 0


@subcommand
def _add_detect(sub) -> None:
    detect = sub.add_parser(
        "detect", help="find the white cells on smear images: square crops + COCO JSON",
        description="Find the white blood cells on smear images with the weight-free stain detector (or "
                    "another tool's saved predictions). Writes crops/, detections.json (COCO, with scores) and "
                    "problems.json; a file that cannot be read is reported there and the batch goes on.")
    detect.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    detect.add_argument("--out", required=True, help="folder to write (must not exist unless --overwrite)")
    detect.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    detect.add_argument("--crop-size", type=int, default=384, help="side of the square crops in pixels (0: keep)")
    detect.add_argument("--margin", type=float, default=0.6, help="context around each box, share of its longer side")
    _add_detector_options(detect)
    detect.add_argument("--min-score", type=float, default=0.0, help="drop detections scoring below this")
    detect.add_argument("--max-pixels", type=int, help="refuse images with more pixels (default 40,000,000)")
    detect.set_defaults(run=_run_detect)


def _run_detect(args) -> int:
    from hemcap.smear import write_detections

    from hemcap.smear.report import describe_red_cells

    detector = _detector(args, min_score=args.min_score)
    out, summary = write_detections(args.images, args.out, detector, crop_size=args.crop_size or None,
                                    margin=args.margin, overwrite=args.overwrite, max_pixels=args.max_pixels,
                                    red_cell_px=args.red_cell_px)
    for row in summary["per_image"]:
        print(f"{row['image']}: {row['cells']} cells, {describe_red_cells(row['red_cells'])}")
    failed = [problem for problem in summary["problems"] if "error" in problem]
    for problem in failed:
        print(f"could not read {problem['file']}: {problem['error']}", file=sys.stderr)
    read, skipped = summary["per_image"], sum("skipped" in problem for problem in summary["problems"])
    print(f"files: {len(read)} read, {len(failed)} unreadable, {skipped} not images; "
          f"{sum(row['cells'] for row in read)} cells; wrote {out} (problems.json lists each problem)")
    return 0


def _add_detector_options(parser) -> None:
    """Which detector finds the cells, and the smears' magnification (shared by detect and caption)."""
    parser.add_argument("--red-cell-px", type=float,
                        help="red-cell diameter in pixels on your images (default: measured on each image)")
    parser.add_argument("--detector", metavar="DIR",
                        help="a learned detector (hemcap train-detector's output) instead of the stain detector")
    parser.add_argument("--yolo-dir", help="take boxes from YOLO txt predictions in this folder instead")
    parser.add_argument("--coco-json", help="take boxes from this COCO predictions file instead")


def _detector(args, min_score: float = 0.0):
    from hemcap.smear import build_detector

    if args.red_cell_px is not None and not args.red_cell_px > 0:
        raise UserError(f"--red-cell-px must be > 0 (the red-cell diameter in pixels), got {args.red_cell_px}")
    return build_detector(args.yolo_dir, args.coco_json, detector_dir=args.detector, min_score=min_score)


@subcommand
def _add_train_detector(sub) -> None:
    from hemcap.smear.train_detector import DetectorTrainingConfig as Defaults

    train = sub.add_parser(
        "train-detector", help="train the learned white-cell detector from random weights (about 6 min on 2 CPU cores)",
        description="Train the learned white-cell detector on labelled smears (TXL-PBC's YOLO layout or BCCD's "
                    "VOC layout), measure it on their val splits per source lab, and save it (safetensors + "
                    "hemcap_detector.json) for `hemcap detect/caption/demo --detector DIR`. Training smears that "
                    "are copies of validation smears are left out.")
    train.add_argument("--data", action="append", required=True, metavar="DIR",
                       help="labelled folder whose train split is learned from (repeat for several)")
    train.add_argument("--val-data", action="append", metavar="DIR",
                       help="folder whose val split measures the detector (repeatable; default: each --data)")
    train.add_argument("--out", default=Defaults.out, help="folder to write (must not exist unless --overwrite)")
    train.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    train.add_argument("--epochs", type=int, default=Defaults.epochs, help="passes over the training smears")
    train.add_argument("--minutes", type=float, default=Defaults.minutes, help="stop training after this long")
    train.add_argument("--batch-size", type=int, default=Defaults.batch_size)
    train.add_argument("--seed", type=int, default=Defaults.seed)
    _add_threads(train)
    train.set_defaults(run=_run_train_detector)


def _run_train_detector(args) -> int:
    from hemcap.smear.train_detector import DetectorTrainingConfig, train

    _use_threads(args)
    cfg = DetectorTrainingConfig(data=tuple(args.data), val_data=tuple(args.val_data or ()), out=args.out,
                                 epochs=args.epochs, minutes=args.minutes, batch_size=args.batch_size, seed=args.seed)
    out = train(cfg, overwrite=args.overwrite)
    print(f"wrote {out}: use it with `hemcap detect --detector {out}` (figures in {out}/hemcap_detector.json)")
    return 0


@subcommand
def _add_caption(sub) -> None:
    caption = sub.add_parser(
        "caption", help="describe every white cell on smear images (or single-cell crops): JSON + overlay",
        description="Find the white cells on each image, caption them, and write <image>.json (per-cell caption, "
                    "attributes, confidences, flags; differential count) and <image>_overlay.png per image, plus "
                    "summary.json. Images already done are skipped, so a stopped run resumes. Under "
                    "`accelerate launch --num_processes N -m hemcap.cli caption ...` the images are split across "
                    "processes (one per GPU; without GPUs add --multi_gpu: --cpu starts a single process).")
    _add_images_model_out(caption, "folder for the reports (created; reused to resume)")
    kind = caption.add_mutually_exclusive_group()
    kind.add_argument("--detect", dest="kind", action="store_const", const="smear",
                      help="every image is a smear: detect the cells, caption each")
    kind.add_argument("--cell", dest="kind", action="store_const", const="cell",
                      help="every image is one cell crop: caption the whole image")
    caption.set_defaults(kind="auto")
    _add_decoding(caption)
    caption.add_argument("--min-confidence", type=float, default=0.5,
                         help="flag attributes stated with a lower token probability")
    caption.add_argument("--margin", type=float, default=0.6, help="context around each cell's box, share of its side")
    caption.add_argument("--crop-size", type=int, default=0, help="side of the crops (0: the model's input size)")
    _add_detector_options(caption)
    caption.add_argument("--crops", action="store_true", help="also save each cell's crop under <image>_crops/")
    caption.add_argument("--max-pixels", type=int, help="refuse images with more pixels (default 40,000,000)")
    _add_device(caption)
    _add_threads(caption)
    caption.add_argument("--overwrite", action="store_true", help="redo images whose reports exist")
    caption.set_defaults(run=_run_caption)


def _run_caption(args) -> int:
    from hemcap.engine import CaptionEngine
    from hemcap.smear import SmearPipeline, process_images, process_state, summary_lines

    process_state()  # join a launcher's group first: sibling processes still starting up would read as busy
    _use_threads(args)
    engine = CaptionEngine.from_dir(args.model, **_engine_options(args))
    pipeline = SmearPipeline(engine, _detector(args), crop_size=args.crop_size or None, margin=args.margin,
                             min_confidence=args.min_confidence, red_cell_px=args.red_cell_px)
    summary = process_images(args.images, args.out, pipeline, kind=args.kind, overwrite=args.overwrite,
                             crops=args.crops, max_pixels=args.max_pixels)
    if process_state().is_main_process:
        print("\n".join(summary_lines(summary, args.out)))
    return 0


@subcommand
def _add_eval_smears(sub) -> None:
    ev = sub.add_parser(
        "eval-smears", help="score cell types end to end on your own labelled smears",
        description="Detect, crop and caption the white cells on labelled smears, then score the cell types "
                    "against a CSV of labels (image,cell_type per cell; add x0,y0,x1,y1 to match boxes): accuracy, "
                    "balanced accuracy, recall per type and the confusion table. Reports go to OUT/reports "
                    "(resumable), the scores to OUT/cell_types.json.")
    _add_images_model_out(ev, "folder for the reports and scores (reused to resume)")
    ev.add_argument("--labels", required=True, help="CSV: image,cell_type[,x0,y0,x1,y1], one row per white cell")
    _add_decoding(ev)
    _add_detector_options(ev)
    _add_device(ev)
    _add_threads(ev)
    ev.add_argument("--overwrite", action="store_true", help="redo images whose reports exist")
    ev.set_defaults(run=_run_eval_smears)


def _run_eval_smears(args) -> int:
    from hemcap.engine import CaptionEngine
    from hemcap.smear import SmearPipeline
    from hemcap.smear.cell_types import confusion_lines, evaluate_smears

    _use_threads(args)
    engine = CaptionEngine.from_dir(args.model, **_engine_options(args))
    pipeline = SmearPipeline(engine, _detector(args), red_cell_px=args.red_cell_px)
    scores = evaluate_smears(args.images, args.labels, args.out, pipeline, overwrite=args.overwrite)
    print("\n".join(confusion_lines(scores, pipeline.cell_types)))
    print(f"{scores['cells']} labelled cells on {scores['images']} images: accuracy {scores['accuracy']:.1%}, "
          f"balanced accuracy {scores['balanced_accuracy']:.1%}, {scores['missed']} not detected")
    for key, what in (("unlabelled_images", "images without labels"), ("labels_without_image", "labels without image")):
        if scores[key]:
            print(f"{len(scores[key])} {what}: {', '.join(scores[key][:5])}{' ...' if len(scores[key]) > 5 else ''}")
    print(f"wrote {args.out}/cell_types.json")
    return 0


@subcommand
def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="open the review page: a smear or cell image in, captions and counts out",
                          description="Serve the Gradio review page for a trained model (research use, not for "
                                      "diagnosis). It binds 127.0.0.1 unless --host says otherwise; a page other "
                                      "machines can reach (--share, another --host) asks for the logins of "
                                      "--auth-file and does not start without them. Uploads and reports stay in "
                                      "a private folder, removed when the demo stops; the image formats and size, "
                                      "the cells captioned per image and the analyses per visitor are limited "
                                      "(README, Demo).")
    demo.add_argument("--model", help="trained model dir (default: the newest quickstart run's model)")
    demo.add_argument("--runs-dir", default="runs", help="where to look for quickstart runs without --model")
    demo.add_argument("--host", default="127.0.0.1",
                      help="address to bind (0.0.0.0 opens it to the network: needs --auth-file)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--share", action="store_true",
                      help="also make a public gradio.live link (off by default; needs --auth-file)")
    demo.add_argument("--auth-file", metavar="FILE",
                      help="logins the page asks for: one user:password a line (# comments); keep it chmod 600")
    demo.add_argument("--detector", metavar="DIR",
                      help="a learned detector (hemcap train-detector's output) instead of the stain detector")
    _add_device(demo)
    _add_threads(demo)
    demo.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from hemcap.review import resolve_model_dir

    model_dir, origin = resolve_model_dir(args.model, args.runs_dir)  # refuse before loading anything heavy
    app = _import_demo_app()
    try:
        logins = app.logins_for(args.host, args.share, args.auth_file)
    except (OSError, ValueError) as error:  # no logins for an exposed page, or an unreadable file of them
        raise UserError(str(error)) from None
    print(origin, flush=True)
    _use_threads(args)
    try:
        app.launch(model_dir, host=args.host, port=args.port, share=args.share, device=args.device,
                   detector_dir=args.detector, auth=logins)
    except OSError as error:
        raise UserError(str(error)) from error
    return 0


def _import_demo_app():
    """``hemcap.demo.app``, installed with hemcap (``demo/`` in the source tree)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise UserError("the demo needs gradio: pip install -c constraints.txt -e '.[demo]'")
    from hemcap.demo import app

    return app


if __name__ == "__main__":
    sys.exit(main())
