"""Caption quality in COCO convention, as a local `evaluate` module.

    import evaluate
    captions = evaluate.load("eval/metrics/hemcap_captions")  # a local path: the Hub route fails offline
    captions.compute(predictions=["Small round lymphocyte ..."], references=[["Lymphocyte, small ..."]])

Wraps `hemcap.metrics.caption_metrics`: PTB tokenisation (Java), BLEU-1..4, CIDEr-D, ROUGE-L and
METEOR through pycocoevalcap, plus BLEU in HemBLIP's convention (NLTK sentence BLEU, smoothing
method 4, averaged per caption). Needs hemcap installed.
"""

import datasets
import evaluate

from hemcap.metrics import caption_metrics

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated captions, one string per image.
    references: the reference captions of each image (a list of strings, or one string).
    meteor: True, False, or None (default) to run METEOR when Java is present.
    bertscore_model: optional local model folder for BERTScore (needs the bert-score package).
Returns:
    bleu_1..bleu_4, cider_d (0-10 scale), rouge_l, meteor (None when not run), bleu_hemblip,
    tokenizer ("ptb", or the regex fallback without Java) and notes (why something was skipped).
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class HemcapCaptions(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Vedantam et al., CIDEr, CVPR 2015; Chen et al., Microsoft COCO Captions, 2015.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references, meteor=None, bertscore_model=None):
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        return caption_metrics(predictions, references, meteor=meteor, bertscore_model=bertscore_model)
