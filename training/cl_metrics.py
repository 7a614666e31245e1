"""Continual-learning metrics from an accuracy matrix (pure functions, no torch).

The matrix `acc` has one row per stage and one column per language:

    acc[i][j] = accuracy (e.g. mean recall) on language j after stage i

Stage 0 is the model before continual learning; column 0 is its base language (English), and
stage i >= 1 is the stage that learned language column i. So the learned languages after stage t
are columns 1..t, and entries of languages not learned yet may be NaN (or zero-shot figures;
they are never used).

    AA_t   = mean_{j=1..t} acc[t][j]                                   (average accuracy)
    F_t    = mean_{j=1..t-1} ( max_{l=j..t-1} acc[l][j] - acc[t][j] )   (forgetting)
    F_en_t = max_{l=0..t-1} acc[l][0] - acc[t][0]                      (English forgetting)

F follows Chaudhry et al. (2018) as CLL-CLIP reports it: how far each earlier language fell from
its best figure; F_en applies the same to the base language, whose best is normally stage 0.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(acc: Matrix, stage: int) -> int:
    rows = len(acc)
    if rows == 0:
        raise ValueError("empty accuracy matrix")
    if stage < 0:
        stage += rows
    if not 0 <= stage < rows:
        raise ValueError(f"stage {stage} out of range for a matrix with {rows} rows")
    if len(acc[stage]) < stage + 1:
        raise ValueError(
            f"row {stage} has {len(acc[stage])} columns; needs at least {stage + 1} "
            "(base language + one per learned language)"
        )
    return stage


def average_accuracy(acc: Matrix, stage: int = -1, include_base: bool = False) -> float:
    """AA after `stage`: mean accuracy over the languages learned so far (columns 1..stage).

    With `include_base` the base language (column 0) counts too; stage 0 gives acc[0][0] then,
    and NaN otherwise (nothing learned yet).
    """
    t = _check(acc, stage)
    cols = range(0 if include_base else 1, t + 1)
    values = [float(acc[t][j]) for j in cols]
    return sum(values) / len(values) if values else math.nan


def forgetting(acc: Matrix, stage: int = -1) -> float:
    """F after `stage`: mean drop of each earlier learned language from its best figure.

    Languages 1..stage-1 count; 0.0 when there is none (after the first language)."""
    t = _check(acc, stage)
    drops = [max(float(acc[lvl][j]) for lvl in range(j, t)) - float(acc[t][j]) for j in range(1, t)]
    return sum(drops) / len(drops) if drops else 0.0


def english_forgetting(acc: Matrix, stage: int = -1) -> float:
    """F_en after `stage`: drop of the base language (column 0) from its best earlier figure."""
    t = _check(acc, stage)
    if t == 0:
        return 0.0
    return max(float(acc[lvl][0]) for lvl in range(t)) - float(acc[t][0])


def summarize(acc: Matrix) -> dict[str, object]:
    """AA, F and F_en after the last stage, and their values after every stage."""
    stages = range(1, len(acc))
    return {
        "AA": average_accuracy(acc) if len(acc) > 1 else math.nan,
        "F": forgetting(acc),
        "F_en": english_forgetting(acc),
        "per_stage": [
            {
                "stage": t,
                "AA": average_accuracy(acc, t),
                "F": forgetting(acc, t),
                "F_en": english_forgetting(acc, t),
            }
            for t in stages
        ],
    }


def matrix_to_csv(acc: Matrix, stages: Sequence[str], languages: Sequence[str]) -> str:
    """CSV text: a header `stage,<lang>...` and one row per stage (empty cell for NaN)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["stage", *languages])
    for name, row in zip(stages, acc, strict=True):
        writer.writerow([name, *("" if _nan(v) else f"{float(v):.4f}" for v in row)])
    return out.getvalue()


def matrix_from_csv(text: str) -> tuple[list[list[float]], list[str], list[str]]:
    """Inverse of `matrix_to_csv`: (matrix, stage names, languages)."""
    rows = list(csv.reader(io.StringIO(text)))
    languages = rows[0][1:]
    stages = [r[0] for r in rows[1:]]
    acc = [[float(v) if v != "" else math.nan for v in r[1:]] for r in rows[1:]]
    return acc, stages, languages


def _nan(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
