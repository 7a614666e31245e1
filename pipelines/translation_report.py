"""What `inspect` shows of translation quality: per language, the distribution of each score
(`translation_score`, `roundtrip_chrf`, `translation_logprob`) and the lowest-scoring
translations next to their sources.

    report = translation_report(OUTPUT)          # any find_shards spec
    print("\\n".join(format_translation_report(report)))
"""

from __future__ import annotations

import heapq
import os
import statistics
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from babelcap.core import schema
from babelcap.core.shards import find_shards
from babelcap.pipelines.display import cell

SIGNALS = ("translation_score", "roundtrip_chrf", "translation_logprob")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    values = sorted(values)
    out: dict[str, Any] = {"n": len(values), "mean": round(statistics.fmean(values), 4)}
    for q in QUANTILES:
        out[f"p{round(100 * q)}"] = round(values[min(len(values) - 1, int(q * len(values)))], 4)
    return out


def translation_report(
    specs: str | os.PathLike | Sequence[str | os.PathLike], lowest: int = 10
) -> dict[str, Any]:
    """{language: {"translations", "scored", signal: {n, mean, p5..p95}, "lowest": [...]}}
    over the shards of `specs`; `lowest` rows per language by translation_score."""
    shard_set = find_shards(specs)
    values: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, list[int]] = {}
    worst: dict[str, list[tuple[float, int, dict[str, Any]]]] = {}
    tie = 0
    for path in shard_set.files:
        pf = pq.ParquetFile(path, filesystem=shard_set.filesystem)
        for batch in pf.iter_batches(batch_size=256, columns=["image_id", "captions"]):
            for row in batch.to_pylist():
                caps = row["captions"] or []
                for cap in caps:
                    if cap["origin"] != schema.ORIGIN_TRANSLATED:
                        continue
                    lang = cap["language"]
                    n = counts.setdefault(lang, [0, 0])
                    n[0] += 1
                    per = values.setdefault(lang, {s: [] for s in SIGNALS})
                    for s in SIGNALS:
                        if cap.get(s) is not None:
                            per[s].append(float(cap[s]))
                    score = cap.get("translation_score")
                    if score is None:
                        continue
                    n[1] += 1
                    j = cap.get("source_index")
                    example = {
                        "image_id": row["image_id"],
                        "source": caps[j]["text"] if j is not None and 0 <= j < len(caps) else None,
                        "translation": cap["text"],
                        **{s: cap.get(s) for s in SIGNALS},
                    }
                    tie += 1
                    # a max-heap of the `lowest` smallest scores (negated)
                    heap = worst.setdefault(lang, [])
                    item = (-float(score), tie, example)
                    if len(heap) < lowest:
                        heapq.heappush(heap, item)
                    elif lowest and item > heap[0]:
                        heapq.heapreplace(heap, item)
    return {
        lang: {
            "translations": counts[lang][0],
            "scored": counts[lang][1],
            **{s: _summary(values[lang][s]) for s in SIGNALS},
            "lowest": [e for _, _, e in sorted(worst.get(lang, []), key=lambda t: (-t[0], t[1]))],
        }
        for lang in sorted(counts)
    }


def format_translation_report(report: dict[str, Any], examples: int = 5) -> list[str]:
    """Markdown lines for `inspect`: the score distributions per language, then the lowest
    examples (text from files goes through `inspect.cell`: no raw control characters)."""
    if not report:
        return []
    qs = [f"p{round(100 * q)}" for q in QUANTILES]
    lines = [
        "",
        "| language | score | n (of translations) | mean | " + " | ".join(qs) + " |",
        "|---|---|---:|---:|" + "---:|" * len(qs),
    ]
    for lang, r in report.items():
        for s in SIGNALS:
            d = r[s]
            if d["n"]:
                values = " | ".join(f"{d[q]:.3f}" for q in qs)
                lines.append(
                    f"| {cell(lang)} | {s} | {d['n']} ({r['translations']}) | {d['mean']:.3f} "
                    f"| {values} |"
                )
    low = [(lang, e) for lang, r in report.items() for e in r["lowest"][:examples]]
    if low:
        lines += [
            "",
            "| language | lowest translation_score | source | translation |",
            "|---|---:|---|---|",
        ]
        lines += [
            f"| {cell(lang)} | {e['translation_score']:.3f} | {cell(e['source'])} | "
            f"{cell(e['translation'])} |"
            for lang, e in low
        ]
    return lines
