import csv
import json

import pytest

from hemcap.captions import paraphrase, parse, render
from hemcap.cli import main
from hemcap.fileio import atomic_path, write_text
from hemcap.metrics import score_records, write_predictions
from hemcap.report import ReportError, compare_reports, read_metrics, write_report
from hemcap.schema import load_schema

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_records(n: int, seed: int) -> list[dict]:
    schema = load_schema("wbcatt")
    records = []
    for i in range(n):
        rng_attrs = {name: field.values[(i * 7 + seed + k) % len(field.values)]
                     for k, (name, field) in enumerate(schema.fields.items())}
        caption = "" if i == 0 else paraphrase(rng_attrs, schema, seed=seed * 100 + i)
        if i % 3 == 1:  # a wrong cell size in every third caption
            caption = caption.replace("small", "large") if "small" in caption else caption.replace("large", "small")
        records.append({
            "id": f"cell{i}", "caption": caption, "references": [render(rng_attrs, schema)],
            "reference_attributes": rng_attrs, "attributes": dict(parse(caption, schema)),
            "confidences": {}, "schema": "wbcatt",
        })
    return records


@pytest.fixture(scope="module")
def scored() -> dict:
    return score_records(make_records(12, seed=0), meteor=False, n_examples=2, meta={"model": "tiny-blip"})


def test_write_report_writes_json_markdown_and_plots(tmp_path, scored):
    out = write_report(scored, tmp_path / "report")
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(scored))
    plots = sorted(p.name for p in (out / "plots").iterdir())
    # confusion matrices only for fields with more than two values
    assert plots == ["attribute_accuracy.png", "confusion_cell_type.png", "confusion_cytoplasm_colour.png",
                     "confusion_granule_colour.png", "confusion_granule_type.png", "confusion_nucleus_shape.png"]
    assert all((out / "plots" / p).read_bytes().startswith(PNG_MAGIC) for p in plots)
    assert not [p for p in out.rglob(".*")], "temp files left behind"

    text = (out / "report.md").read_text()
    for heading in ("# Evaluation report: tiny-blip", "## Caption quality", "## Morphological faithfulness",
                    "## Parser on the references", "### Best", "### Worst", "### Random sample"):
        assert heading in text
    assert "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | CIDEr-D | ROUGE-L |" in text
    size = scored["faithfulness"]["fields"]["cell_size"]
    assert f"| `cell_size` | {100 * size['accuracy']:.1f} | {100 * size['stated_accuracy']:.1f} |" in text
    assert "**mean (attributes)**" in text and "| `cell_type` |" in text
    assert "not computed (no re-annotation file given)" in text
    assert "100.0% of 12 reference captions parse back" in text
    assert "generated: (empty)" in text  # the empty caption is the worst example
    assert "![attribute_accuracy](plots/attribute_accuracy.png)" in text


def test_write_report_without_plots(tmp_path, scored):
    out = write_report(scored, tmp_path, plots=False)
    assert not (out / "plots").exists() and "## Plots" not in (out / "report.md").read_text()


def test_atomic_writes_keep_the_old_file_when_writing_fails(tmp_path):
    target = write_text(tmp_path / "metrics.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_compare_reports_side_by_side(tmp_path, scored):
    other = score_records(make_records(9, seed=1), meteor=False, n_examples=1, meta={"label": "LoRA"})
    first = write_report(scored, tmp_path / "full", plots=False)
    second = write_report(other, tmp_path / "lora", plots=False)
    out = compare_reports([first, second], tmp_path / "cmp")
    text = (out / "comparison.md").read_text()
    assert "## Table 1: caption quality" in text and "| report | BLEU-1 |" in text
    assert "| field | tiny-blip | LoRA | majority (tiny-blip) | human (tiny-blip) |" in text
    assert f"| tiny-blip | {scored['caption']['bleu_1']:.3f} |" in text
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["label"] for r in rows] == ["tiny-blip", "LoRA"]
    other_size = other["faithfulness"]["fields"]["cell_size"]
    assert float(rows[1]["cell_size_accuracy"]) == pytest.approx(other_size["accuracy"])
    assert rows[1]["meteor"] == ""  # not computed is empty, not zero
    assert (out / "comparison_accuracy.png").read_bytes().startswith(PNG_MAGIC)

    relabelled = compare_reports([first, second], tmp_path / "cmp2", labels=["full", "lora"])
    assert "| field | full | lora |" in (relabelled / "comparison.md").read_text()


def test_compare_reports_bad_input(tmp_path, scored):
    with pytest.raises(ReportError, match="no metrics.json"):
        compare_reports([tmp_path], tmp_path / "out")
    report = write_report(scored, tmp_path / "r", plots=False)
    with pytest.raises(ReportError, match="1 labels for 2 reports"):
        compare_reports([report, report], tmp_path / "out", labels=["one"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{")
    with pytest.raises(ReportError, match="unreadable"):
        read_metrics(tmp_path / "broken")


def test_cli_score_and_compare(tmp_path, capsys):
    predictions = write_predictions(make_records(6, seed=2), tmp_path / "eval" / "predictions.jsonl")
    assert main(["score", str(predictions), "--no-meteor", "--examples", "1", "--no-plots"]) == 0
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "report.md").is_file()
    assert "mean attribute accuracy" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "eval"), str(tmp_path / "eval"), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.csv").is_file()

    (tmp_path / "bad.jsonl").write_bytes(b'{"id": "a"}\n')
    assert main(["score", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 1: missing key(s) caption" in capsys.readouterr().err
