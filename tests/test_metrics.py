import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from hemcap import metrics
from hemcap.captions import paraphrase, parse, render
from hemcap.metrics import (
    CONTRADICTED,
    OMITTED,
    PredictionsError,
    caption_metrics,
    confusion_matrix,
    faithfulness_metrics,
    human_agreement,
    lcs_length,
    macro_f1,
    parser_accuracy,
    ptb_tokenize,
    read_label_rows,
    read_predictions,
    score_predictions,
    write_predictions,
)
from hemcap.metrics import captions as caption_scores
from hemcap.schema import load_schema

EVAL_METRICS = Path(__file__).resolve().parents[1] / "eval" / "metrics"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is needed for the PTB tokenizer and METEOR")

BAND_NEUTROPHIL = {
    "cell_size": "big", "cell_shape": "round", "nucleus_shape": "unsegmented-band",
    "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "small",
    "granule_colour": "pink", "granularity": "yes", "cell_type": "Neutrophil",
}
LYMPHOCYTE = BAND_NEUTROPHIL | {
    "cell_size": "small", "nucleus_shape": "unsegmented-round", "nuclear_cytoplasmic_ratio": "high",
    "cytoplasm_colour": "blue", "granule_type": "nil", "granule_colour": "nil", "granularity": "no",
    "cell_type": "Lymphocyte",
}


def record(i, caption, truth=BAND_NEUTROPHIL, **changes):
    base = {
        "id": f"img{i}", "caption": caption, "references": [render(truth)], "reference_attributes": truth,
        "attributes": dict(parse(caption or "")), "confidences": {"cell_size": 0.9, "cell_type": None},
        "schema": "wbcatt",
    }
    return base | changes


def write_lines(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


# ------------------------------------------------------------------------- caption metrics


@needs_java
def test_cider_d_matches_a_hand_computed_two_image_case():
    # Two images, one reference each, so log(#images) = log 2 and every n-gram's df <= 1: each
    # n-gram weighs tf * log 2. Image 1, "a b a" vs "a b": unigram cosine 2/sqrt(10), bigram
    # 1/sqrt(2), no 3/4-grams in the reference; pycocoevalcap's length counts bigrams (2 vs 1), so
    # the Gaussian penalty is exp(-1/72). Image 2 is exact: mean(1, 1, 0, 0) * 10 = 5.
    result = caption_metrics(["a b a", "c d"], [["a b"], ["c d"]], meteor=False, with_per_caption=True)
    image1 = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert result["per_caption"]["cider_d"] == pytest.approx([image1, 5.0])
    assert result["cider_d"] == pytest.approx((image1 + 5.0) / 2) == pytest.approx(4.151357, abs=1e-6)


@needs_java
def test_bleu_and_rouge_l_by_hand():
    result = caption_metrics(["a b c e"], [["a b c d"]], meteor=False)
    # clipped precisions 3/4, 2/3, 1/2, 0/1; same length, so no brevity penalty
    assert result["bleu_1"] == pytest.approx(0.75, abs=1e-6)
    assert result["bleu_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-6)
    assert result["bleu_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-6)
    assert result["bleu_4"] < 1e-3
    # ROUGE-L: LCS("a b c d", "a c e") = 2, P = 2/4, R = 2/3, beta = 1.2
    rouge = caption_metrics(["a b c d"], [["a c e"]], meteor=False)["rouge_l"]
    p, r = 0.5, 2 / 3
    assert rouge == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))


@needs_java
def test_identical_captions_score_perfectly_and_empty_captions_score_zero():
    caption = render(BAND_NEUTROPHIL)
    result = caption_metrics([caption, ""], [[caption], [caption]], meteor=False, with_per_caption=True)
    assert result["per_caption"]["bleu_hemblip"] == pytest.approx([1.0, 0.0])
    assert result["bleu_hemblip"] == pytest.approx(0.5)
    assert result["per_caption"]["cider_d"][1] == 0.0
    assert result["meteor"] is None and "METEOR not computed (turned off)" in result["notes"]


def test_hemblip_bleu_is_nltk_sentence_bleu_with_method4():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    gts = {0: ["the cell is large and round", "a large round cell"], 1: ["small cell"]}
    hyps = {0: ["the cell is large"], 1: ["small round cell"]}
    mean, each = metrics.hemblip_bleu(gts, hyps)
    smooth = SmoothingFunction().method4
    expected = [sentence_bleu([r.split() for r in gts[k]], hyps[k][0].split(), smoothing_function=smooth) for k in gts]
    assert each == pytest.approx(expected) and mean == pytest.approx(np.mean(expected))


def test_cider_d_equals_pycocoevalcap_cider_bit_for_bit():
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(2)
    words = "a b c d e f g".split()
    pool = [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(25)]  # repeats across images
    gts = {i: rng.sample(pool, rng.randint(1, 4)) for i in range(40)}
    hyps = {i: [rng.choice(pool + [""])] for i in range(40)}
    expected, expected_each = Cider().compute_score(gts, hyps)
    score, each = metrics.cider_d(gts, hyps)
    assert score == expected and each == list(expected_each)


def test_fast_rouge_equals_pycocoevalcap_rouge():
    from pycocoevalcap.rouge.rouge import Rouge, my_lcs

    rng = random.Random(0)
    words = "a b c d e f".split()
    gts, hyps = {}, {}
    for i in range(60):
        hyps[i] = [" ".join(rng.choices(words, k=rng.randint(1, 12)))]
        gts[i] = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 3))]
        assert lcs_length(hyps[i][0].split(), gts[i][0].split()) == my_lcs(hyps[i][0].split(), gts[i][0].split())
    slow, slow_each = Rouge().compute_score(gts, hyps)
    fast, fast_each = metrics.FastRouge().compute_score(gts, hyps)
    assert fast == pytest.approx(slow) and np.allclose(fast_each, slow_each)


@needs_java
def test_ptb_tokenizer_and_its_regex_fallback_agree_on_hemcap_captions():
    tokens, used = ptb_tokenize(["Hello, World. A low N:C ratio", "", "it's 3.5 (x)", "two\nlines\u2028here", ""])
    assert used == "ptb"
    assert tokens == ["hello world a low n c ratio", "", "it 's 3.5 -lrb- x -rrb-", "two lines here", ""]
    schema, rng = load_schema("wbcatt"), random.Random(1)
    texts = []
    for k in range(40):
        attributes = {n: rng.choice(f.values) for n, f in schema.fields.items()}
        texts += [render(attributes, schema, k % len(schema.templates)), paraphrase(attributes, schema, seed=k)]
    assert ptb_tokenize(texts)[0] == [caption_scores._regex_tokenize(t) for t in texts]


def test_without_java_tokenizes_by_regex_and_notes_meteor(monkeypatch):
    monkeypatch.setattr(caption_scores.shutil, "which", lambda name: None)
    result = caption_metrics(["A large, round cell."], [["a large round cell"]])
    assert result["tokenizer"].startswith("regex") and result["meteor"] is None
    assert any("needs Java" in note for note in result["notes"])
    assert result["bleu_4"] == pytest.approx(1.0)


@needs_java
@pytest.mark.slow
def test_meteor_runs_when_java_is_present():
    caption = "large round neutrophil with a band shaped nucleus"
    result = caption_metrics([caption, "small cell"], [[caption], ["small round lymphocyte"]])
    assert 0.3 < result["meteor"] < 1.0


def test_bertscore_is_skipped_with_a_note_when_it_cannot_run(tmp_path):
    notes = []
    assert metrics.bertscore(["a"], [["a"]], tmp_path / "missing", notes) == {}
    assert "BERTScore skipped" in notes[0]


def test_ids_must_match_between_predictions_and_references():
    with pytest.raises(PredictionsError, match=r"1 prediction id\(s\) without references \['b'\]"):
        caption_metrics({"a": "x", "b": "y"}, {"a": ["x"], "c": ["z"]})
    with pytest.raises(PredictionsError, match="2 predictions but 1 reference lists"):
        caption_metrics(["x", "y"], [["x"]])
    with pytest.raises(PredictionsError, match="non-empty list"):
        caption_metrics(["x"], ["x"])


# ---------------------------------------------------------------------------- faithfulness


def test_faithfulness_by_hand_on_one_field():
    truth = [BAND_NEUTROPHIL | {"cell_size": s} for s in ("big", "big", "small", "small")]
    captions = ["Neutrophil, large and round.", "Neutrophil, small and round.", "Neutrophil.",
                "Neutrophil, small and round."]
    size = faithfulness_metrics(captions, truth)["fields"]["cell_size"]
    assert size["accuracy"] == 0.5  # 2 right of 4; the omission counts wrong
    assert size["stated_accuracy"] == pytest.approx(2 / 3)
    assert size["coverage"] == 0.75 and size["contradiction_rate"] == 0.0
    # F1(big) = 2*1/(2+1), F1(small) = 2*1/(2+2)
    assert size["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert size["confusion"]["matrix"] == [[1, 1, 0, 0], [0, 1, 1, 0]]
    assert size["confusion"]["columns"] == ["big", "small", OMITTED, CONTRADICTED]


def test_perfect_captions_and_empty_captions():
    truth = [BAND_NEUTROPHIL, LYMPHOCYTE]
    perfect = faithfulness_metrics([render(a, variant=i) for i, a in enumerate(truth)], truth)
    assert all(perfect["attribute_mean"][k] == 1.0 for k in ("accuracy", "stated_accuracy", "coverage", "macro_f1"))
    empty = faithfulness_metrics(["", ""], truth)
    assert empty["attribute_mean"]["accuracy"] == 0.0 and empty["attribute_mean"]["coverage"] == 0.0
    assert empty["fields"]["cell_size"]["stated_accuracy"] is None
    assert empty["attribute_mean"]["stated_accuracy"] is None  # undefined when nothing is stated
    assert empty["fields"]["granularity"]["confusion"]["matrix"] == [[0, 0, 1, 0], [0, 0, 1, 0]]


def test_contradiction_counts_as_mentioned_and_wrong():
    caption = render(BAND_NEUTROPHIL).replace("large and round", "large and round. It is small and round")
    size = faithfulness_metrics([caption], [BAND_NEUTROPHIL])["fields"]["cell_size"]
    assert size["contradiction_rate"] == 1.0 and size["coverage"] == 1.0
    assert size["accuracy"] == 0.0 and size["stated_accuracy"] == 0.0
    assert size["confusion"]["matrix"] == [[0, 0, 0, 1], [0, 0, 0, 0]]


def test_faithfulness_rejects_bad_reference_rows():
    with pytest.raises(PredictionsError, match=r"row 1: cell_size='huge' is not a wbcatt value"):
        faithfulness_metrics(["x", "y"], [BAND_NEUTROPHIL, BAND_NEUTROPHIL | {"cell_size": "huge"}])
    with pytest.raises(PredictionsError, match=r"baseline labels: 11 problem\(s\)"):
        faithfulness_metrics(["x"], [BAND_NEUTROPHIL], baseline_attributes=[{"cell_size": "big"}])
    with pytest.raises(PredictionsError, match="no captions"):
        faithfulness_metrics([], [])


def test_attribute_mean_leaves_out_the_cell_type():
    wrong_type = render(BAND_NEUTROPHIL | {"cell_type": "Monocyte"})
    result = faithfulness_metrics([wrong_type], [BAND_NEUTROPHIL])
    assert result["attribute_mean"]["accuracy"] == 1.0
    assert result["fields"]["cell_type"]["accuracy"] == 0.0
    assert result["targets"] == ["cell_type"] and "cell_type" not in result["attributes"]


def test_majority_baseline_from_training_labels_or_references():
    truth = [BAND_NEUTROPHIL, BAND_NEUTROPHIL, LYMPHOCYTE]
    captions = [render(a) for a in truth]
    train = [LYMPHOCYTE] * 3 + [BAND_NEUTROPHIL]
    size = faithfulness_metrics(captions, truth, baseline_attributes=train)["fields"]["cell_size"]
    assert size["majority_value"] == "small" and size["majority_accuracy"] == pytest.approx(1 / 3)
    assert size["majority_macro_f1"] == pytest.approx((0 + 2 * 1 / (1 + 3)) / 2)
    own = faithfulness_metrics(captions, truth)
    assert own["fields"]["cell_size"]["majority_value"] == "big"
    assert own["baseline_source"].startswith("references")


def test_macro_f1_agrees_with_per_class_precision_and_recall():
    rng = random.Random(3)
    values = ["a", "b", "c", "d"]
    truth = [rng.choice(values[:3]) for _ in range(200)]  # "d" never true, sometimes predicted
    predicted = [rng.choice(values + [OMITTED, CONTRADICTED]) for _ in range(200)]
    f1s = []
    for v in values:
        tp = sum(t == p == v for t, p in zip(truth, predicted))
        precision = tp / max(predicted.count(v), 1)
        recall = tp / max(truth.count(v), 1)
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    assert macro_f1(confusion_matrix(truth, predicted, values)) == pytest.approx(np.mean(f1s))


def test_parser_accuracy_on_references():
    good = parser_accuracy([[render(BAND_NEUTROPHIL, variant=v) for v in range(4)]], [BAND_NEUTROPHIL], "wbcatt")
    assert good["accuracy"] == 1.0 and good["n_captions"] == 4
    bad = parser_accuracy([["Neutrophil, large and round."]], [BAND_NEUTROPHIL], "wbcatt")
    assert bad["accuracy"] == 0.0 and bad["failures"][0]["wrong"]["granularity"] is None


def test_human_agreement_on_small_tables(tmp_path):
    header = "img_name,label,cell_size,cell_shape,nucleus_shape,nuclear_cytoplasmic_ratio,chromatin_density," \
             "cytoplasm_vacuole,cytoplasm_texture,cytoplasm_colour,granule_type,granule_colour,granularity,path\n"
    row = "{},Neutrophil,{},round,unsegmented-band,low,densely,no,clear,light blue,small,pink,yes,x.jpg\n"
    (tmp_path / "orig.csv").write_text(header + row.format("a", "big") + row.format("b", "big"))
    (tmp_path / "again.csv").write_text(header + row.format("a", "big") + row.format("b", "small"))
    result = human_agreement(tmp_path / "again.csv", [tmp_path / "orig.csv"])
    assert result["fields"]["cell_size"] == 0.5 and result["fields"]["cell_shape"] == 1.0
    assert result["attribute_mean"] == pytest.approx((10 + 0.5) / 11) and result["n_images"] == 2
    (tmp_path / "again.csv").write_text(header + row.format("zz", "big"))
    with pytest.raises(PredictionsError, match="not in the originals"):
        human_agreement(tmp_path / "again.csv", [tmp_path / "orig.csv"])


@pytest.mark.realdata
def test_human_ceiling_reproduces_wbcatt_numbers(shared_data):
    result = human_agreement(shared_data / "wbcatt" / "pbc_attr_reannotations.csv")
    assert result["n_images"] == 1000
    assert result["fields"]["cell_size"] == pytest.approx(0.898)
    assert result["fields"]["nucleus_shape"] == pytest.approx(0.903)
    assert round(result["attribute_mean"], 3) == 0.961  # WBCAtt's reported 96.1%


def test_training_labels_read_from_a_prepared_dataset(tmp_path):
    import datasets

    schema = load_schema("wbcatt")
    columns = {n: [BAND_NEUTROPHIL[n], LYMPHOCYTE[n]] for n in schema.field_names}
    train = datasets.Dataset.from_dict(columns | {"id": ["a", "b"]})
    datasets.DatasetDict({"train": train}).save_to_disk(tmp_path / "d")
    assert read_label_rows(tmp_path / "d") == [BAND_NEUTROPHIL, LYMPHOCYTE]
    with pytest.raises(PredictionsError, match="no split 'test'"):
        read_label_rows(tmp_path / "d", split="test")


def test_training_labels_csv_must_have_the_schema_columns(tmp_path):
    (tmp_path / "t.csv").write_text("img_name,label\nx.jpg,Neutrophil\n")
    with pytest.raises(PredictionsError, match="missing column\\(s\\) cell_size"):
        read_label_rows(tmp_path / "t.csv")


@pytest.mark.realdata
def test_training_labels_read_from_the_wbcatt_csv(shared_data):
    rows = read_label_rows(shared_data / "wbcatt" / "pbc_attr_v1_train.csv")
    assert len(rows) == 6169 and set(rows[0]) == set(load_schema("wbcatt").field_names)


# ---------------------------------------------------------------------- predictions files


@needs_java
def test_score_predictions_from_the_file_alone(tmp_path):
    records = [
        record(0, render(BAND_NEUTROPHIL, variant=2)),
        record(1, "", LYMPHOCYTE),
        record(2, paraphrase(LYMPHOCYTE | {"cell_size": "big"}, seed=3), LYMPHOCYTE),
        record(3, "Neutrophil, large and round. It is small and round.", attributes={"cell_size": "big"}),
    ]
    path = write_predictions(records, tmp_path / "predictions.jsonl")
    result = score_predictions(path, meteor=False, n_examples=1)
    faith = result["faithfulness"]
    assert result["n"] == 4 and result["parser_on_references"]["accuracy"] == 1.0
    assert faith["fields"]["cell_size"]["accuracy"] == 0.25
    assert faith["fields"]["cell_size"]["contradiction_rate"] == 0.25
    assert faith["fields"]["cell_type"]["accuracy"] == 0.75
    assert result["examples"]["best"][0]["id"] == "img0" and result["examples"]["worst"][0]["id"] == "img1"
    assert any("differ from parse(caption)" in note for note in result["notes"])  # line 4's stored attributes
    # confidences {"cell_size": 0.9, "cell_type": None}: cell_size stated right on line 1, wrong on line 3
    assert result["confidence"] == {"n": 2, "mean_when_right": 0.9, "mean_when_wrong": 0.9}
    json.dumps(result)  # metrics.json must be plain JSON


@pytest.mark.parametrize(
    "lines, message",
    [
        ([record(0, "x"), b"\xff\xfe{}"], r"predictions.jsonl:2: not valid UTF-8"),
        ([b"{not json"], r":1: invalid JSON"),
        ([b"[1, 2]"], r":1: expected a JSON object"),
        ([{k: v for k, v in record(0, "x").items() if k != "references"}], r"line 1: missing key\(s\) references"),
        ([record(0, "x"), record(0, "y")], r"line 2: duplicate id 'img0' \(first on line 1\)"),
        ([record(0, "x", id="")], r"line 1: field 'id' must be a non-empty string"),
        ([record(0, None)], r"line 1: field 'caption' must be a string"),
        ([record(0, "x", references=[])], r"line 1: field 'references' must be a non-empty list"),
        ([record(0, "x", references=[""])], r"line 1: field 'references' must be a non-empty list"),
        ([record(0, "x", reference_attributes=BAND_NEUTROPHIL | {"cell_size": "huge"})],
         r"line 1: reference_attributes: cell_size='huge' is not a wbcatt value"),
        ([record(0, "x", reference_attributes={"cell_size": "big"})], r"line 1: reference_attributes: missing field"),
        ([record(0, "x", confidences={"cell_size": 2})], r"line 1: confidences.cell_size=2 is not null"),
        ([record(0, "x", attributes={"nucleus": "x"})], r"line 1: field 'attributes' has unknown field\(s\) nucleus"),
        ([record(0, "x"), record(1, "x", schema="leukemiaattri")], r"lines name different schemas"),
        ([b"", b"  "], r"no predictions"),
        ([record(0, "caption \udcff")], r"line 1: field 'caption' holds a lone surrogate \(\\udcff\)"),
        ([record(0, "x", references=7)], r"line 1: field 'references' must be a non-empty list"),
    ],
)
def test_bad_predictions_files_get_clear_errors(tmp_path, lines, message):
    path = write_lines(tmp_path / "predictions.jsonl", lines)
    with pytest.raises(PredictionsError, match=message):
        read_predictions(path)


def test_unknown_schema_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="schema 'nope' is not shipped with hemcap; give it \\(hemcap score --schema"):
        read_predictions(write_lines(tmp_path / "p.jsonl", [record(0, "x", schema="nope")]))
    with pytest.raises(FileNotFoundError, match="predictions file not found"):
        read_predictions(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------ evaluate modules


@needs_java
def test_evaluate_modules_load_from_local_paths_and_compute():
    import evaluate

    captions = evaluate.load(str(EVAL_METRICS / "hemcap_captions"))
    reference = render(BAND_NEUTROPHIL)
    result = captions.compute(predictions=[reference, "a cell"], references=[[reference], [reference]], meteor=False)
    assert 0 < result["bleu_4"] < 1 and result["tokenizer"] == "ptb"
    single = captions.compute(predictions=[reference, "a cell"], references=[reference, reference], meteor=False)
    assert single["cider_d"] == pytest.approx(result["cider_d"])

    faith = evaluate.load(str(EVAL_METRICS / "hemcap_faithfulness"))
    result = faith.compute(predictions=[reference, ""], references=[reference, render(LYMPHOCYTE)])
    assert result["accuracy"] == 0.5 and result["cell_type_accuracy"] == 0.5
    assert result["fields"]["cell_size"]["coverage"] == 0.5
    with pytest.raises(ValueError, match=r"references\[0\] does not state"):
        faith.compute(predictions=["x"], references=["Neutrophil."])
