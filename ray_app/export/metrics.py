"""Generation metrics against reference answers, all on a 0-100 scale.

ROUGE-L is Google's `rouge-score` (the reference implementation of ROUGE-1.5.5), BLEU is
`sacrebleu` (standard 13a tokenization, corpus level), so the numbers compare with
published ones.
"""

from __future__ import annotations

import functools
import math

from ray_app.extras import require


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), 0-100.

    >>> round(rouge_l("the cat sat on a mat", "the cat sat on the mat"), 1)
    83.3
    """
    return 100.0 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


@functools.cache
def _rouge_scorer():
    rouge_scorer = require("rouge_score.rouge_scorer", "ray-app eval (ROUGE-L)")
    return rouge_scorer.RougeScorer(["rougeL"])


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after collapsing whitespace."""
    return " ".join(prediction.split()) == " ".join(reference.split())


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    """Mean ROUGE-L F1, corpus BLEU and exact-match rate (all 0-100); None without pairs."""
    if not references:
        return {"rouge_l": None, "bleu": None, "exact_match": None}
    sacrebleu = require("sacrebleu", "ray-app eval (BLEU)")
    n = len(references)
    return {
        "rouge_l": math.fsum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "exact_match": 100.0 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
    }
