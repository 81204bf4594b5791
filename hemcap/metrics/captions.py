"""Caption metrics in COCO's convention (PTB tokens; BLEU-1..4, CIDEr-D, ROUGE-L, METEOR), HemBLIP's
BLEU, and BERTScore from a local model (conventions in ``hemcap.metrics``' docstring)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from pycocoevalcap.rouge.rouge import Rouge

from hemcap.metrics.predictions import PredictionsError

# Bytes that a line-preserving tokenizer would read as a line break inside one caption.
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x85\u2028\u2029]")


def ptb_tokenize(texts: Sequence[str]) -> tuple[list[str], str]:
    """COCO tokenisation of ``texts``: PTB tokens, lower case, punctuation dropped.

    Runs pycocoevalcap's Stanford PTBTokenizer once for all texts (through stdin, so nothing is
    written into site-packages). Without Java it falls back to a regex with the same behaviour
    on hemcap's captions. Returns the tokenised texts and which tokenizer was used.
    """
    if not shutil.which("java"):
        return [_regex_tokenize(t) for t in texts], "regex (no Java: approximates PTB)"
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar_dir = Path(ptbtokenizer.__file__).parent
    command = ["java", "-cp", str(jar_dir / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR),
               "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    lines = "\n".join(_LINE_BREAKS.sub(" ", t) for t in texts)
    done = subprocess.run(command, input=lines.encode("utf-8"), capture_output=True, check=False)
    out = done.stdout.decode("utf-8").split("\n")  # one line per text, no trailing newline
    if done.returncode != 0 or len(out) != len(texts):
        raise RuntimeError(f"PTB tokenizer failed (exit {done.returncode}, {len(out)} lines for {len(texts)} "
                           f"texts): {done.stderr.decode(errors='replace')[-500:]}")
    drop = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in out], "ptb"


_REGEX_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|'\w+|\w+(?:-\w+)*|[^\w\s]")
_REGEX_DROP = frozenset(["'", "`", ".", "?", "!", ",", ":", "-", ";", '"'])


def _regex_tokenize(text: str) -> str:
    return " ".join(t for t in _REGEX_TOKEN.findall(text.lower()) if t not in _REGEX_DROP)


# -------------------------------------------------------------------------- caption metrics


def caption_metrics(
    predictions: Sequence[str] | Mapping[str, str],
    references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]],
    *,
    meteor: bool | None = None,
    bertscore_model: str | Path | None = None,
    with_per_caption: bool = False,
) -> dict:
    """BLEU-1..4, CIDEr-D, ROUGE-L (and METEOR) in COCO convention, plus HemBLIP's BLEU.

    ``predictions`` and ``references`` are aligned lists or mappings keyed by id (their ids must
    match). ``meteor=None`` runs METEOR when Java is present. Scores are fractions; CIDEr-D is on
    its usual 0..10 scale. ``with_per_caption`` adds per-caption CIDEr-D and HemBLIP BLEU lists.
    """
    predictions, references = _align(predictions, references)
    tokens, tokenizer = ptb_tokenize(list(predictions) + [r for refs in references for r in refs])
    hyps, gts, at = {}, {}, len(predictions)
    for i, refs in enumerate(references):
        hyps[i], gts[i] = [tokens[i]], tokens[at : at + len(refs)]
        at += len(refs)
    result, per_caption = _coco_scores(gts, hyps)
    result["tokenizer"], result["notes"] = tokenizer, []
    if tokenizer != "ptb":
        result["notes"].append("Java not found: tokenised with a regex that approximates PTB; not exact COCO")
    result["bleu_hemblip"], per_caption["bleu_hemblip"] = hemblip_bleu(gts, hyps)
    result["meteor"] = _meteor(gts, hyps, meteor, result["notes"])
    if bertscore_model:
        result.update(bertscore(predictions, references, bertscore_model, result["notes"]))
    if with_per_caption:
        result["per_caption"] = per_caption
    return result


def _align(predictions, references) -> tuple[list[str], list[list[str]]]:
    if isinstance(predictions, Mapping) != isinstance(references, Mapping):
        raise PredictionsError("predictions and references must both be lists or both be mappings by id")
    if isinstance(predictions, Mapping):
        only_pred = sorted(set(predictions) - set(references))
        only_ref = sorted(set(references) - set(predictions))
        if only_pred or only_ref:
            raise PredictionsError(
                f"ids do not match: {len(only_pred)} prediction id(s) without references {only_pred[:5]}, "
                f"{len(only_ref)} reference id(s) without a prediction {only_ref[:5]}"
            )
        ids = list(predictions)
        predictions, references = [predictions[i] for i in ids], [references[i] for i in ids]
    if len(predictions) != len(references):
        raise PredictionsError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise PredictionsError("no predictions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise PredictionsError(f"references[{i}] must be a non-empty list of captions")
    return [p or "" for p in predictions], [list(r) for r in references]


def _coco_scores(gts: dict, hyps: dict) -> tuple[dict, dict]:
    from pycocoevalcap.bleu.bleu import Bleu

    bleu, _ = Bleu(4).compute_score(gts, hyps, verbose=0)
    cider, cider_each = cider_d(gts, hyps)
    rouge, _ = FastRouge().compute_score(gts, hyps)
    result = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    result |= {"cider_d": float(cider), "rouge_l": float(rouge)}
    return result, {"cider_d": [float(c) for c in cider_each]}


def cider_d(gts: Mapping, hyps: Mapping, n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """pycocoevalcap's CIDEr-D, bit for bit, about 2.7x faster (3.3 s -> 1.2 s, 3,099 images x 4 refs).

    Same n-grams (its ``precook``), document frequencies over each image's references, TF-IDF
    with idf = log(#images) - log(max(1, df)), clipped cosine per n, Gaussian length penalty
    (sigma 6; "length" counts bigrams, as pycocoevalcap does), mean over n, over references, x10.
    The speed comes from computing each distinct caption's vector once, and each n-gram's IDF once.
    """
    scorer = _CiderD(gts, n, sigma)
    scores = [scorer.image_score(hyps[key][0], gts[key]) for key in gts]
    return float(np.mean(np.array(scores))), scores


class _CiderD:
    def __init__(self, gts: Mapping, n: int, sigma: float):
        from pycocoevalcap.cider.cider_scorer import precook

        self.n, self.two_sigma_sq, self.precook = n, 2 * sigma**2, precook
        self.cooked: dict[str, dict] = {}
        self.vectors: dict[str, tuple] = {}
        df: Counter = Counter()
        for refs in gts.values():
            df.update({g for ref in refs for g in self.cook(ref)})
        self.log_images = np.log(float(len(gts)))
        self.idf = {g: self.log_images - np.log(max(1.0, float(d))) for g, d in df.items()}

    def cook(self, text: str) -> dict:
        if text not in self.cooked:
            self.cooked[text] = self.precook(text, self.n)
        return self.cooked[text]

    def vector(self, text: str) -> tuple[list[dict], list[float], int]:
        if text not in self.vectors:
            vec, norm, length = [{} for _ in range(self.n)], [0.0] * self.n, 0
            for gram, tf in self.cook(text).items():
                k = len(gram) - 1
                vec[k][gram] = weight = float(tf) * self.idf.get(gram, self.log_images)
                norm[k] += pow(weight, 2)
                length += tf if k == 1 else 0
            self.vectors[text] = (vec, [np.sqrt(x) for x in norm], length)
        return self.vectors[text]

    def image_score(self, hyp: str, refs: Sequence[str]) -> float:
        vec, norm, length = self.vector(hyp)
        score = [0.0] * self.n
        for ref in refs:
            ref_vec, ref_norm, ref_length = self.vector(ref)
            penalty = np.e ** (-(float(length - ref_length) ** 2) / self.two_sigma_sq)
            for k in range(self.n):
                sim = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and ref_norm[k] != 0:
                    sim /= norm[k] * ref_norm[k]
                score[k] += sim * penalty
        return float(np.mean(np.array(score)) / len(refs) * 10.0)


def hemblip_bleu(gts: Mapping, hyps: Mapping) -> tuple[float, list[float]]:
    """NLTK sentence BLEU-4 with smoothing method 4, per caption against its references, averaged."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method4
    scores = []
    for key, hyp in hyps.items():
        words = hyp[0].split()
        refs = [r.split() for r in gts[key]]
        scores.append(float(sentence_bleu(refs, words, smoothing_function=smooth)) if words else 0.0)
    return float(np.mean(scores)), scores


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): one big-int step per token."""
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


class FastRouge(Rouge):
    """pycocoevalcap's ROUGE-L (beta 1.2, max precision and recall over the references) with a
    bit-parallel LCS: identical scores, ~18x faster than its pure-Python table (3.3 s -> 0.18 s
    on the WBCAtt test split with 4 references each)."""

    def calc_score(self, candidate, refs):
        token_c = candidate[0].split(" ")
        token_refs = [r.split(" ") for r in refs]
        lcs = [lcs_length(r, token_c) for r in token_refs]
        prec = max(n / len(token_c) for n in lcs)
        rec = max(n / len(r) for n, r in zip(lcs, token_refs))
        if prec == 0 or rec == 0:
            return 0.0
        return ((1 + self.beta**2) * prec * rec) / float(rec + self.beta**2 * prec)


def _meteor(gts: dict, hyps: dict, wanted: bool | None, notes: list[str]) -> float | None:
    if wanted is False:
        notes.append("METEOR not computed (turned off)")
        return None
    if not shutil.which("java"):
        notes.append("METEOR not computed: it needs Java (java not found on PATH)")
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        score, _ = Meteor().compute_score(gts, hyps)
    except Exception as error:  # a JVM that dies must not lose the other metrics
        notes.append(f"METEOR failed: {error!r}")
        return None
    return float(score)


def bertscore(predictions, references, model_dir, notes: list[str], layers: int | None = None) -> dict:
    """BERTScore P/R/F1 (means) with a local model directory; a note instead when it cannot run."""
    try:
        import bert_score
    except ImportError:
        notes.append("BERTScore skipped: the bert-score package is not installed (pip install bert-score)")
        return {}
    if not Path(model_dir).is_dir():
        notes.append(f"BERTScore skipped: model directory {model_dir} not found (only local models are used)")
        return {}
    if layers is None:
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(model_dir, local_files_only=True).num_hidden_layers
    p, r, f = bert_score.score(list(predictions), [list(x) for x in references],
                               model_type=str(model_dir), num_layers=layers, verbose=False)
    notes.append(f"BERTScore with {model_dir}, layer {layers}, no baseline rescaling")
    return {"bertscore_precision": float(p.mean()), "bertscore_recall": float(r.mean()),
            "bertscore_f1": float(f.mean())}
