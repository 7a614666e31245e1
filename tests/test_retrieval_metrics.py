"""Retrieval recall as CLIP_benchmark defines it, checked against CLIP_benchmark's own function.

`recall_at_k` and `batchify` are imported from the installed `clip_benchmark` package (1.6.2,
installed by `make venv` without its dependencies: its metric module needs torch and tqdm only);
`clip_benchmark_metrics` below repeats the two metric lines of its `evaluate`, which takes a
model and a dataloader rather than embeddings.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

from babelcap.training.evaluate import (
    EmbeddingCache,
    clip_benchmark_records,
    language_summary,
    retrieval_metrics,
    to_markdown,
    write_clip_benchmark_results,
)

# --------------------------------------------------------------- CLIP_benchmark's own metric


def clip_benchmark_metrics(images_emb, texts_emb, texts_image_index, recall_k_list=(1, 5, 10)):
    """The metric part of clip_benchmark.metrics.zeroshot_retrieval.evaluate."""
    batch_size, device = 64, "cpu"
    scores = texts_emb @ images_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), texts_image_index] = True
    metrics = {}
    for recall_k in recall_k_list:
        metrics[f"image_retrieval_recall@{recall_k}"] = (
            (batchify(recall_at_k, scores, positive_pairs, batch_size, device, k=recall_k) > 0)
            .float()
            .mean()
            .item()
        )
        metrics[f"text_retrieval_recall@{recall_k}"] = (
            (batchify(recall_at_k, scores.T, positive_pairs.T, batch_size, device, k=recall_k) > 0)
            .float()
            .mean()
            .item()
        )
    return metrics


# --------------------------------------------------------------- fixtures


def _embeddings(n_images: int, captions_per_image: list[int], dim: int = 16, noise: float = 1.2):
    """Random unit embeddings, captions near their image (so recall is neither 0 nor 100)."""
    g = torch.Generator().manual_seed(n_images * 31 + dim)
    images = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    t2i = [i for i, n in enumerate(captions_per_image) for _ in range(n)]
    texts = images[t2i] + noise * torch.randn(len(t2i), dim, generator=g) / dim**0.5
    return images, F.normalize(texts, dim=-1), t2i


def _as_clip_benchmark(ours: dict[str, float]) -> dict[str, float]:
    out = {}
    for k in (1, 5, 10):
        out[f"image_retrieval_recall@{k}"] = ours[f"t2i_r{k}"] / 100
        out[f"text_retrieval_recall@{k}"] = ours[f"i2t_r{k}"] / 100
    return out


@pytest.mark.parametrize("tie_rule", ["babelcap", "clip_benchmark"])
@pytest.mark.parametrize(
    "shape",
    [
        (50, [1] * 50),  # XM3600 / XTD10 as CLIP_benchmark reads them: one caption per image
        (40, [5] * 40),  # Flickr30k / COCO: five per image
        (30, [1, 2, 3, 5] * 7 + [4, 1]),  # uneven, as XM3600 with every caption
    ],
)
def test_recall_equals_clip_benchmark_on_tie_free_data(tie_rule, shape):
    n_images, per_image = shape
    images, texts, t2i = _embeddings(n_images, per_image)
    want = clip_benchmark_metrics(images, texts, t2i)
    # distinct caption strings: babelcap's identical-caption rule has nothing to merge
    strings = [f"caption {i}" for i in range(len(t2i))]
    got = retrieval_metrics(images, texts, t2i, strings, tie_rule=tie_rule)
    for key, value in _as_clip_benchmark(got).items():
        assert value == pytest.approx(want[key], abs=1e-6), key
    assert 0 < got["t2i_r1"] < 100 and 0 < got["i2t_r1"] < got["i2t_r10"]  # informative data
    assert got["mean_recall"] == pytest.approx(sum(_as_clip_benchmark(got).values()) * 100 / 6)


def test_image_to_text_counts_an_image_found_when_any_caption_is_in_top_k():
    # image 0 has two captions: the first is closest to image 1, the second to image 0
    images = torch.eye(3)
    texts = torch.tensor([[0.3, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.2, 1.0], [0.0, 1.0, 0.1]])
    texts = F.normalize(texts, dim=-1)
    t2i = [0, 0, 2, 1]
    for rule in ("babelcap", "clip_benchmark"):
        m = retrieval_metrics(images, texts, t2i, ["a", "b", "c", "d"], tie_rule=rule)
        assert m["i2t_r1"] == 100.0  # every image has one caption ranked first
        assert m["t2i_r1"] == 75.0  # caption "a" finds image 1 first
    assert clip_benchmark_metrics(images, texts, t2i, (1,))["text_retrieval_recall@1"] == 1.0


def test_the_rules_differ_only_on_ties_and_repeated_captions():
    images = torch.eye(4)
    flat = torch.ones(4, 4) / 2  # every caption scores every image alike
    strict = retrieval_metrics(images, flat, [0, 1, 2, 3], tie_rule="babelcap")
    lenient = retrieval_metrics(images, flat, [0, 1, 2, 3], tie_rule="clip_benchmark")
    assert strict["t2i_r1"] == 0.0  # babelcap: a tie with a wrong image is a miss
    want = clip_benchmark_metrics(images, flat, [0, 1, 2, 3], (1,))
    assert lenient["t2i_r1"] / 100 == pytest.approx(want["image_retrieval_recall@1"])
    # two images with the same caption string: correct for both under babelcap's rule only
    texts = F.normalize(torch.tensor([[1.0, 0.0, 0, 0], [1.0, 0.05, 0, 0]]), dim=-1)
    same = ["a red circle", "a red circle"]
    assert retrieval_metrics(images[:2], texts, [0, 1], same)["t2i_r1"] == 100.0
    assert retrieval_metrics(images[:2], texts, [0, 1], same, "clip_benchmark")["t2i_r1"] == 50.0


def test_clip_benchmark_rule_ranks_only_images_with_captions_in_the_language():
    images, texts, t2i = _embeddings(20, [1] * 20)
    # ten more images without captions in this language: CLIP_benchmark's per-language dataset
    # would not hold them, so they must not change its figures
    extra = F.normalize(torch.randn(10, images.shape[1], generator=torch.Generator()), dim=-1)
    got = retrieval_metrics(torch.cat([images, extra]), texts, t2i, tie_rule="clip_benchmark")
    assert _as_clip_benchmark(got) == pytest.approx(clip_benchmark_metrics(images, texts, t2i))
    with pytest.raises(ValueError, match="tie rule"):
        retrieval_metrics(images, texts, t2i, tie_rule="nope")


def _result(model: str, per_lang: dict[str, float]) -> dict:
    languages = {}
    for lang, base in per_lang.items():
        m = {f"{d}_r{k}": base + k for d in ("t2i", "i2t") for k in (1, 5, 10)}
        m["mean_recall"] = sum(m.values()) / 6
        m["captions"] = 10
        languages[lang] = m
    return {
        "model": model,
        "dataset": "xm3600",
        "arch": "ViT-B-32",
        "pretrained": "laion2b",
        "languages": languages,
        "summary": language_summary(languages),
    }


def test_summary_across_languages_and_clip_benchmark_records():
    result = _result("base", {"en": 50.0, "pt": 40.0, "hi": 15.0})
    s = result["summary"]["t2i_r1"]
    assert s["average"] == pytest.approx((51 + 41 + 16) / 3)
    assert s["spread"] == pytest.approx(35.0) and (s["min_language"], s["max_language"]) == (
        "hi",
        "en",
    )
    assert s["std"] == pytest.approx(torch.tensor([51.0, 41.0, 16.0]).std(unbiased=False).item())
    assert language_summary({"en": result["languages"]["en"]}) == {}  # one language: nothing
    records = clip_benchmark_records(result)
    assert [r["language"] for r in records] == ["en", "pt", "hi"]
    first = records[0]
    assert {k: first[k] for k in ("dataset", "model", "pretrained", "task")} == {
        "dataset": "crossmodal3600",
        "model": "ViT-B-32",
        "pretrained": "laion2b",
        "task": "zeroshot_retrieval",
    }
    assert first["metrics"]["image_retrieval_recall@5"] == pytest.approx(0.55)
    assert first["metrics"]["text_retrieval_recall@10"] == pytest.approx(0.60)
    json.dumps(records)
    table = to_markdown({"base": result})
    assert "| mean_recall | base |" in table and "spread" in table


def test_clip_benchmark_result_files_one_object_each_in_its_layout(tmp_path):
    """As CLIP_benchmark's eval writes them and its build reads a folder: one JSON object per
    file named {dataset}_{pretrained}_{model}_{language}_{task}.json, its dataset names and
    language codes (XTD10's Japanese is jp, a Karpathy COCO JSON is mscoco_captions)."""
    xtd = {**_result("base", {"en": 50.0, "ja": 30.0}), "dataset": "xtd10"}
    coco = {**_result("tuned", {"pt": 40.0}), "dataset": "karpathy-coco"}
    coco["pretrained"] = "runs/x/export"  # a folder: "/" becomes "_", as CLIP_benchmark does
    coco["languages"]["de"] = {"zs_classes": 50.0}  # classification only: no retrieval record
    folder = tmp_path / "clip_benchmark"
    folder.mkdir()
    (folder / "xtd10_laion2b_ViT-B-32_ko_zeroshot_retrieval.json").write_text("{}")  # stale
    paths = write_clip_benchmark_results({"base": xtd, "tuned": coco}, folder)
    assert (
        sorted(p.name for p in folder.iterdir())
        == sorted(p.name for p in paths)
        == [
            "mscoco_captions_runs_x_export_ViT-B-32_pt_zeroshot_retrieval.json",
            "xtd10_laion2b_ViT-B-32_en_zeroshot_retrieval.json",
            "xtd10_laion2b_ViT-B-32_jp_zeroshot_retrieval.json",
        ]
    )
    for path in paths:
        record = json.loads(path.read_text())  # one object, not lines
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
        assert record["task"] == "zeroshot_retrieval"
        assert set(record["metrics"]) == {
            f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)
        }
    jp = json.loads((folder / "xtd10_laion2b_ViT-B-32_jp_zeroshot_retrieval.json").read_text())
    assert jp["language"] == "jp" and jp["metrics"]["image_retrieval_recall@1"] == pytest.approx(
        0.31
    )
    # two models of one report that CLIP_benchmark would name alike: a label prefix each
    twins = write_clip_benchmark_results(
        {"a": _result("a", {"en": 1.0}), "b": _result("b", {"en": 2.0})}, folder
    )
    assert [p.name for p in twins] == [
        "a_crossmodal3600_laion2b_ViT-B-32_en_zeroshot_retrieval.json",
        "b_crossmodal3600_laion2b_ViT-B-32_en_zeroshot_retrieval.json",
    ]
    assert len(list(folder.iterdir())) == 2  # the earlier run's files went first


def test_embedding_cache_reuses_by_content_and_refuses_pickles(tmp_path):
    import numpy as np

    cache = EmbeddingCache(tmp_path)

    class Bundle:  # just what model_key reads; the key itself is tested with a real model
        pass

    cache.model_key = lambda bundle: "m"  # type: ignore[method-assign]  # no weights to hash
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6, dtype=torch.float32).reshape(3, 2)

    a = cache.get(Bundle(), "texts-pt", ["a", "b", "c"], compute)
    b = cache.get(Bundle(), "texts-pt", ["a", "b", "c"], compute)
    assert torch.equal(a, b) and len(calls) == 1
    cache.get(Bundle(), "texts-pt", ["a", "b", "d"], compute)  # other content, other entry
    assert len(calls) == 2 and len(list((tmp_path / "m").glob("*.npy"))) == 2
    # a pickled object array in the cache is refused, not executed
    target = tmp_path / "m" / f"texts-pt-{EmbeddingCache.content_key(['a', 'b', 'c'])}.npy"
    assert target.is_file()
    np.save(target, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        cache.get(Bundle(), "texts-pt", ["a", "b", "c"], compute)
