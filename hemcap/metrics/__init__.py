"""Caption quality and morphological faithfulness, scored from a predictions file alone.

Caption metrics follow the COCO convention through ``pycocoevalcap``: captions are lower-cased and
split by Stanford's PTB tokenizer (Java) with punctuation dropped, then BLEU-1..4, CIDEr-D and
ROUGE-L are computed over the whole set, and METEOR too when Java is present. Beside them sits BLEU
in HemBLIP's convention (NLTK ``sentence_bleu``, smoothing method 4, on the same PTB tokens, one
score per caption against that image's references, averaged), and an optional BERTScore from a
local model directory.

Faithfulness metrics parse each generated caption (``hemcap.captions.parse``) and compare it with
the reference attributes, field by field:

- ``accuracy``: correct / all captions; an omitted or self-contradicting field counts as wrong.
  This is the main figure.
- ``stated_accuracy``: correct / captions that mention the field (HemBLIP's convention); a
  contradiction counts as mentioned and wrong.
- ``coverage``: captions that mention the field / all captions.
- ``contradiction_rate``: captions that state two different values for the field / all captions.
- ``macro_f1``: mean F1 over the field's values present in references or predictions; omitted and
  contradicted predictions are misses (false negatives) of the true value.
- ``confusion``: rows are true values, columns the predicted values plus ``(omitted)`` and
  ``(contradicted)``.

The attribute mean averages the morphological attributes only; the schema's targets (cell type,
diagnosis) are reported on their own. Each field is set beside the majority-class baseline (the
most frequent value in the training labels, or in the references when no training labels are
given) and, when a re-annotation file is given, the human agreement ceiling.

predictions.jsonl
-----------------
UTF-8, one JSON object per line (blank lines are ignored), one line per image::

    {"id": "BA_1223",                       # unique, non-empty string
     "caption": "Basophil, small and ...",  # the generated caption; "" means nothing was stated
     "references": ["Basophil, ..."],       # non-empty list of non-empty reference captions
     "reference_attributes": {"cell_size": "small", ..., "cell_type": "Basophil"},
     "attributes": {"cell_size": "small", "cell_shape": null, ...},  # parse(caption)
     "confidences": {"cell_size": 0.93, "cell_shape": null, ...},    # per field, 0..1 or null
     "schema": "wbcatt"}                    # same on every line

``reference_attributes`` must hold every field of the schema with a schema value. ``attributes``
is what the captioner parsed; scoring re-parses ``caption`` and notes any line where the two
differ, so the metrics always follow the current parser.

Modules
-------
``predictions`` (the file), ``captions`` (caption metrics), ``faithfulness`` (per-field scores),
``baselines`` (training labels, human ceiling, parser check), ``scoring`` (all of them at once).
Every public name is importable from ``hemcap.metrics`` itself.
"""

from hemcap.metrics.baselines import human_agreement, parser_accuracy, read_label_rows
from hemcap.metrics.captions import (FastRouge, bertscore, caption_metrics, cider_d, hemblip_bleu, lcs_length,
                                     ptb_tokenize)
from hemcap.metrics.faithfulness import (CONTRADICTED, FIELD_METRICS, OMITTED, confusion_matrix, faithfulness_metrics,
                                         field_scores, macro_f1, majority_baseline, predicted_label)
from hemcap.metrics.predictions import (PREDICTION_KEYS, PredictionsError, check_attribute_rows, check_predictions,
                                        read_predictions, write_predictions)
from hemcap.metrics.scoring import confidence_summary, score_predictions, score_records, select_examples

__all__ = [
    "CONTRADICTED", "FIELD_METRICS", "OMITTED", "PREDICTION_KEYS", "FastRouge", "PredictionsError", "bertscore",
    "caption_metrics", "check_attribute_rows", "check_predictions", "cider_d", "confidence_summary",
    "confusion_matrix", "faithfulness_metrics", "field_scores", "hemblip_bleu", "human_agreement", "lcs_length",
    "macro_f1", "majority_baseline", "parser_accuracy", "predicted_label", "ptb_tokenize", "read_label_rows",
    "read_predictions", "score_predictions", "score_records", "select_examples", "write_predictions",
]
