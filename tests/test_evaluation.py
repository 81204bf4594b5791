"""`hemcap eval` end to end on a tiny model trained on synthetic data (the CI check of issue 4)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hemcap.cli import main
from hemcap.metrics import score_predictions

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """blip_tiny trained for its 24 steps on a generated synthetic set."""
    work = tmp_path_factory.mktemp("tiny_run")
    result = subprocess.run(
        [sys.executable, "-m", "hemcap.cli", "train", "--config", str(ROOT / "configs" / "blip_tiny.yaml"),
         "--data", str(work / "data"), "--output-dir", str(work / "run")],
        capture_output=True, text=True, timeout=900, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run" / "model", work / "data"


@pytest.mark.slow
def test_eval_writes_every_report_file(trained, tmp_path, capsys):
    model, data = trained
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(data), "--split", "test", "--out", str(out)]) == 0
    assert "mean attribute accuracy" in capsys.readouterr().out
    for name in ("predictions.jsonl", "metrics.json", "report.md"):
        assert (out / name).is_file(), name
    assert list((out / "plots").glob("*.png")) if (out / "plots").exists() else list(out.glob("*.png"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["meta"]["split"] == "test"
    caption = metrics["caption"]
    assert {"bleu_4", "cider_d", "rouge_l"} <= set(caption)
    assert metrics["parser_on_references"]["accuracy"] == 1.0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])) >= {"id", "caption", "confidences", "reference_attributes"}
    rescored = score_predictions(out / "predictions.jsonl", meteor=False)
    assert rescored["faithfulness"]["attribute_mean"]["accuracy"] == pytest.approx(
        metrics["faithfulness"]["attribute_mean"]["accuracy"])


def test_eval_bad_inputs(tiny_blip_dir, tmp_path, capsys):
    from hemcap.recipes import prepare_synthetic

    data = prepare_synthetic(tmp_path / "data", n_train=4, n_val=2, n_test=2, size=32)
    code = main(["eval", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "r")])
    assert code == 2 and "model dir" in capsys.readouterr().err
    code = main(["eval", "--model", str(tiny_blip_dir), "--data", str(data), "--split", "holdout", "--out", str(tmp_path / "r")])
    assert code == 2 and "no split 'holdout'" in capsys.readouterr().err
    no_processor = tmp_path / "bare"
    no_processor.mkdir()
    (no_processor / "config.json").write_text((tiny_blip_dir / "config.json").read_text())
    code = main(["eval", "--model", str(no_processor), "--data", str(data), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(no_processor) in err
    code = main(["eval", "--model", str(tiny_blip_dir), "--data", str(data), "--out", str(tmp_path / "r"), "--device", "gpu0"])
    assert code == 2 and "device 'gpu0' is not a torch device" in capsys.readouterr().err
    code = main(["eval", "--model", str(tiny_blip_dir), "--data", str(data), "--out", str(tmp_path / "r"), "--batch", "0"])
    assert code == 2 and "decode_chunk must be >= 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_eval_in_other_labs_looks(trained, tmp_path, capsys):
    from hemcap.synthetic import draw_smear

    model, data = trained
    looks = tmp_path / "looks"
    for name, tint in (("bluish", (0.8, 0.9, 1.1)), ("same", (1.0, 1.0, 1.0))):
        (looks / name).mkdir(parents=True)
        for seed in range(3):
            pixels = np.asarray(draw_smear(seed)[0], np.float32) * np.array(tint)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(looks / name / f"{seed}.png")
    out = tmp_path / "report"
    argv = ["eval", "--model", str(model), "--data", str(data), "--split", "test", "--out", str(out), "--no-meteor",
            "--look", str(looks / "bluish"), "--look", str(looks / "same")]
    assert main(argv) == 0
    assert "| bluish |" in capsys.readouterr().out
    rows = {row["look"]: row for row in json.loads((out / "metrics.json").read_text())["looks"]}
    assert list(rows) == ["in domain", "bluish", "same"] and rows["in domain"]["attribute_drop"] == 0
    assert 50 <= rows["bluish"]["red_cell_px"] <= 70  # measured on the look's smears
    assert rows["bluish"]["definition"]["lab_mean"][2] < rows["same"]["definition"]["lab_mean"][2]  # bluer: lower b*
    for name in ("bluish", "same"):
        assert (out / "looks" / name / "predictions.jsonl").is_file()
        assert 0 <= rows[name]["attribute_accuracy"] <= 1
    assert (out / "looks.md").read_text().count("\n| ") == 4  # header + in domain + two looks
