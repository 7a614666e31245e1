"""Benchmark readers on small copies laid out as each publisher distributes the dataset, written
from the test world's images and gold captions (nothing downloaded): each reader must give the
world's own evaluation data back (same image ids in the same order, same captions per language)
and the counts the layout implies; then `babelcap eval --dataset` end to end."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from babelcap.training.benchmarks.common import DatasetError
from babelcap.training.eval_data import load_eval_data, split_options
from babelcap.world.load import load_gold

LANGS = ["en", "pt", "de"]


@pytest.fixture(scope="module")
def gold(world_dir: Path) -> dict[str, list[dict]]:
    return {lang: load_gold(world_dir, lang, "test") for lang in LANGS}


def world(world_dir: Path, languages=LANGS, max_captions=None):
    return load_eval_data(f"world:{world_dir}", languages, "test", max_captions=max_captions)


def assert_same(data, ref, languages) -> None:
    assert data.image_ids == ref.image_ids and len(data.images) == len(ref.images)
    for lang in languages:
        assert data.texts[lang] == ref.texts[lang], lang
        assert data.text_to_image[lang] == ref.text_to_image[lang], lang


def copy_image(world_dir: Path, row: dict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((world_dir / row["image_path"]).read_bytes())


def key(row: dict) -> str:
    return Path(row["image_path"]).stem


# ------------------------------------------------------------------ XM3600


def write_xm3600(world_dir: Path, gold, root: Path) -> Path:
    lines = []
    for i, row in enumerate(gold["en"]):
        copy_image(world_dir, row, root / "images" / f"{key(row)}.jpg")
        line = {"image/key": key(row), "image/locale": "en"}
        for lang in LANGS:
            caps = gold[lang][i]["captions"]
            line[lang] = {"caption": caps, "caption/tokenized": [c.lower() for c in caps]}
        lines.append(line)
    lines.append({"image/key": "notdownloaded", "en": {"caption": ["x"]}})  # image missing
    (root / "captions.jsonl").write_text(
        "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8"
    )
    return root


def test_xm3600(world_dir, gold, tmp_path):
    root = write_xm3600(world_dir, gold, tmp_path / "xm3600")
    n = len(gold["en"])
    first = load_eval_data(f"xm3600:{root}", LANGS)  # CLIP_benchmark's reading: 1st caption
    assert_same(first, world(world_dir, max_captions=1), LANGS)
    assert len(first.images) == n and first.name == "xm3600"
    assert first.info["missing_images"] == 1  # skipped with a warning, as CLIP_benchmark does
    every = load_eval_data(f"xm3600:{root},captions=all", ["pt", "de"])
    assert_same(every, world(world_dir, ["pt", "de"]), ["pt", "de"])
    assert len(every.texts["pt"]) == sum(len(r["captions"]) for r in gold["pt"])
    assert len(load_eval_data(f"xm3600:{root}", ["en"], max_images=7).images) == 7
    with pytest.raises(DatasetError, match=r"no captions in hi; it has de, en, pt"):
        load_eval_data(f"xm3600:{root}", ["en", "hi"])
    with pytest.raises(ValueError, match="takes no option"):
        load_eval_data(f"xm3600:{root},colour=blue", ["en"])


# ------------------------------------------------------------------ XTD10


def coco_names(rows: list[dict], train_share: float = 0.8) -> list[str]:
    """COCO 2014 file names for `rows` as XTD10 lists them: the first 80% from train2014, the
    rest from val2014 (XTD10: 800 + 200), each with a 12-digit COCO id."""
    n_train = round(len(rows) * train_share)
    return [
        f"COCO_{'train2014' if i < n_train else 'val2014'}_{i + 1:012d}.jpg"
        for i in range(len(rows))
    ]


def write_coco(world_dir: Path, rows: list[dict], names: list[str], root: Path, layout: str):
    """The rows' images under `root` as `names`: ``2014`` (COCO as distributed: train2014/
    and val2014/), ``flat`` (one folder, as CLIP_benchmark's XTD10 images.tar.gz) or ``2017``
    (train2017/ and val2017/ with bare 12-digit ids)."""
    for row, name in zip(rows, names, strict=True):
        split, number = name.split("_")[1], name.rsplit("_", 1)[1]
        target = {
            "2014": root / split / name,
            "flat": root / name,
            "2017": root / split.replace("2014", "2017") / number,
        }[layout]
        copy_image(world_dir, row, target)


def test_xtd10(world_dir, gold, tmp_path):
    root, coco = tmp_path / "Cross-lingual-Test-Dataset-XTD10", tmp_path / "coco"
    names = coco_names(gold["en"])
    n_val = sum(n.startswith("COCO_val2014_") for n in names)
    assert 0 < n_val < len(names)  # both of XTD10's COCO folders are used
    write_coco(world_dir, gold["en"], names, coco, "2014")
    (root / "XTD10").mkdir(parents=True)
    (root / "XTD10" / "test_image_names.txt").write_text("\n".join(names) + "\n")
    files = {"en": "XTD10/test_1kcaptions_en.txt", "de": "MIC/test_1kcaptions_de.txt"}
    files["pt"] = "STAIR/test_1kcaptions_jp.txt"  # pt captions stand in for Japanese
    for lang, rel in files.items():
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_text("\n".join(r["captions"][0] for r in gold[lang]) + "\n")
    data = load_eval_data(f"xtd10:{root},images={coco}", ["en", "de", "ja"])
    ref = world(world_dir, max_captions=1)
    assert_same(data, ref, ["en", "de"])
    assert data.texts["ja"] == ref.texts["pt"] and len(data.images) == len(names)
    assert data.info["missing_images"] == 0
    # every language there when none is named (jp read as ja), the same data
    every = load_eval_data(f"xtd10:{root},images={coco}", None)
    assert list(every.texts) == ["de", "en", "ja"] and every.texts == data.texts
    # val2014 alone (the old README's images=coco/val2014) has only XTD10's val images
    val_only = load_eval_data(f"xtd10:{root},images={coco / 'val2014'}", ["en"])
    assert len(val_only.images) == n_val
    assert val_only.info["missing_images"] == len(names) - n_val
    # one flat folder (CLIP_benchmark's images.tar.gz, the default PATH/images) and COCO 2017
    write_coco(world_dir, gold["en"], names, root / "images", "flat")
    flat = load_eval_data(f"xtd10:{root}", ["en"])
    assert flat.image_ids == ref.image_ids and flat.info["missing_images"] == 0
    write_coco(world_dir, gold["en"], names, tmp_path / "coco2017", "2017")
    later = load_eval_data(f"xtd10:{root},images={tmp_path / 'coco2017'}", ["en"])
    assert later.image_ids == ref.image_ids and later.info["missing_images"] == 0
    with pytest.raises(DatasetError, match=r"test_1kcaptions_ko\.txt"):
        load_eval_data(f"xtd10:{root},images={coco}", ["ko"])
    # a caption file out of step with the image list is an error, not a silent misalignment
    (root / "XTD10" / "test_1kcaptions_en.txt").write_text("one\ntwo\n")
    with pytest.raises(DatasetError, match="2 lines for"):
        load_eval_data(f"xtd10:{root},images={coco}", ["en"])


# ------------------------------------------------------------------ Multi30K


def test_multi30k(world_dir, gold, tmp_path):
    root, flickr = tmp_path / "multi30k-dataset", tmp_path / "flickr30k-images"
    task = root / "data" / "task1"
    (task / "raw").mkdir(parents=True)
    (task / "image_splits").mkdir()
    names = [f"{key(r)}.jpg" for r in gold["en"]]
    for row, name in zip(gold["en"], names, strict=True):
        copy_image(world_dir, row, flickr / name)
    (task / "image_splits" / "test_2016_flickr.txt").write_text("\n".join(names) + "\n")
    (task / "image_splits" / "val.txt").write_text("\n".join(names[:5]) + "\n")
    with gzip.open(task / "raw" / "test_2016_flickr.en.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(r["captions"][0] for r in gold["en"]) + "\n")  # .gz as committed
    (task / "raw" / "test_2016_flickr.de").write_text(
        "\n".join(r["captions"][0] for r in gold["de"]) + "\n"
    )
    (task / "raw" / "val.en").write_text("\n".join(r["captions"][1] for r in gold["en"][:5]))
    data = load_eval_data(f"multi30k:{root},images={flickr}", ["en", "de"])
    assert_same(data, world(world_dir, max_captions=1), ["en", "de"])
    val = load_eval_data(f"multi30k:{root},val,images={flickr}", ["en"])
    assert len(val.images) == 5 and val.texts["en"][0] == gold["en"][0]["captions"][1]
    assert list(load_eval_data(f"multi30k:{root},images={flickr}", None).texts) == ["de", "en"]
    with pytest.raises(DatasetError, match="test_2017_flickr"):
        load_eval_data(f"multi30k:{root},test_2017_flickr,images={flickr}", ["en"])


def test_multi30k_test_2017_mscoco(world_dir, gold, tmp_path):
    """test_2017_mscoco lists COCO 2014 images from train2014 and val2014 as
    ``COCO_train2014_000000117071.jpg#367178`` (a COCO caption id after the #)."""
    root, coco = tmp_path / "multi30k-dataset", tmp_path / "coco"
    task = root / "data" / "task1"
    (task / "raw").mkdir(parents=True)
    (task / "image_splits").mkdir()
    names = coco_names(gold["en"], train_share=0.6)
    write_coco(world_dir, gold["en"], names, coco, "2014")
    lines = [f"{name}#{367178 + i}" for i, name in enumerate(names)]
    (task / "image_splits" / "test_2017_mscoco.txt").write_text("\n".join(lines) + "\n")
    for lang in ("en", "de"):
        with gzip.open(task / "raw" / f"test_2017_mscoco.{lang}.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(r["captions"][0] for r in gold[lang]) + "\n")
    data = load_eval_data(f"multi30k:{root},test_2017_mscoco,images={coco}", None)
    assert list(data.texts) == ["de", "en"]
    assert_same(data, world(world_dir, max_captions=1), ["en", "de"])
    assert len(data.images) == len(names) and data.info["missing_images"] == 0


# ------------------------------------------------------------------ Karpathy JSON


def test_karpathy_json_and_translated_copy(world_dir, gold, tmp_path):
    root = tmp_path / "flickr30k"
    train = {lang: load_gold(world_dir, lang, "train")[:8] for lang in ("en", "pt")}
    for lang, suffix in (("en", ""), ("pt", "_pt")):
        images = []
        for split, rows in (("test", gold[lang]), ("train", train[lang])):
            for i, row in enumerate(rows):
                copy_image(world_dir, row, root / "flickr30k-images" / f"{key(row)}.jpg")
                sentences = [{"raw": c, "tokens": c.split(), "sentid": 0} for c in row["captions"]]
                images.append(
                    {
                        "filename": f"{key(row)}.jpg",
                        "imgid": i,
                        "split": split,
                        "sentences": sentences,
                    }
                )
        doc = {"images": images, "dataset": "flickr30k"}
        (root / f"dataset_flickr30k{suffix}.json").write_text(json.dumps(doc, ensure_ascii=False))
    main = root / "dataset_flickr30k.json"
    data = load_eval_data(f"karpathy:{main}", ["en", "pt"])  # split test by default
    assert_same(data, world(world_dir, ["en", "pt"]), ["en", "pt"])
    assert len(data.texts["en"]) == sum(len(r["captions"]) for r in gold["en"])  # every sentence
    assert len(load_eval_data(f"karpathy:{main},train", ["en"]).images) == 8
    assert len(load_eval_data(f"karpathy:{main},all", ["pt"]).images) == len(gold["en"]) + 8
    # the translated copy alone, its language from its name
    alone = load_eval_data(f"karpathy:{root / 'dataset_flickr30k_pt.json'}", ["pt"])
    assert alone.texts["pt"] == data.texts["pt"]
    every = load_eval_data(f"karpathy:{root / 'dataset_flickr30k_pt.json'}", None)
    assert list(every.texts) == ["en", "pt"] and every.texts == data.texts  # the original: en
    with pytest.raises(DatasetError, match=r"dataset_flickr30k_de\.json"):
        load_eval_data(f"karpathy:{main}", ["de"])


def karpathy_row(row: dict, split: str, sentences: list[str], **extra) -> dict:
    raw = [{"raw": c, "tokens": c.split(), "sentid": 0} for c in sentences]
    return {"filename": f"{key(row)}.jpg", "split": split, "sentences": raw, **extra}


def test_karpathy_flickr30k_with_translations_as_shipped(world_dir, gold, tmp_path):
    """The English Karpathy JSON gives images and splits; Portuguese comes in Flickr30k's
    token format (CAPIVARA's Flickr30k-PT, named with pt=FILE), German as CLIP_benchmark's
    flickr30k_test_de.txt next to the JSON (found by its name; unquoted commas)."""
    root = tmp_path / "flickr30k"
    train = load_gold(world_dir, "en", "train")[:4]
    rows = [karpathy_row(r, "test", r["captions"]) for r in gold["en"]]
    rows += [karpathy_row(r, "train", r["captions"]) for r in train]
    for row in [*gold["en"], *train]:
        copy_image(world_dir, row, root / "flickr30k-images" / f"{key(row)}.jpg")
    main = root / "dataset_flickr30k.json"
    main.write_text(json.dumps({"images": rows, "dataset": "flickr30k"}))
    # token format, every caption of every image (train ones too: the JSON picks the split)
    token = [
        f"{key(r)}.jpg#{k}\t{c}"
        for r in [*gold["pt"], *load_gold(world_dir, "pt", "train")[:4]]
        for k, c in enumerate(r["captions"])
    ]
    (root / "flickr30k_pt.token").write_text("\n".join(token) + "\n", encoding="utf-8")
    de = [[*r["captions"]] for r in gold["de"]]
    de[0][0] = "ein Hund, eine Katze, ein Pferd"  # commas inside an unquoted caption
    pairs = zip(gold["de"], de, strict=True)
    lines = ["image,caption", *(f"{key(r)}.jpg,{c}" for r, cs in pairs for c in cs)]
    (root / "flickr30k_test_de.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    data = load_eval_data(f"karpathy:{main},pt=flickr30k_pt.token", None)  # every language
    assert list(data.texts) == ["de", "en", "pt"] and data.name == "karpathy-flickr30k"
    ref = world(world_dir, ["en", "pt", "de"])
    assert_same(data, ref, ["en", "pt"])
    assert len(data.images) == len(gold["en"])  # the test split only
    assert len(data.texts["pt"]) == sum(len(r["captions"]) for r in gold["pt"])
    assert data.texts["de"] == [c for cs in de for c in cs]
    assert data.text_to_image["de"] == ref.text_to_image["de"]
    # the same token file found by its name next to the JSON
    (root / "flickr30k_pt.token").rename(root / "dataset_flickr30k_pt.token")
    by_name = load_eval_data(f"karpathy:{main}", ["pt"])
    assert by_name.texts["pt"] == data.texts["pt"]
    assert len(load_eval_data(f"karpathy:{main},train", ["pt"]).texts["pt"]) == sum(
        len(r["captions"]) for r in load_gold(world_dir, "pt", "train")[:4]
    )
    with pytest.raises(DatasetError, match="unknown option imags="):
        load_eval_data(f"karpathy:{main},imags={root}", ["en"])
    (root / "wrong.token").write_text("nothere.jpg#0\tuma foto\n")
    with pytest.raises(DatasetError, match="captions for none"):
        load_eval_data(f"karpathy:{main},hi=wrong.token", ["hi"])


def test_karpathy_coco_with_coco_annotations_translation(world_dir, gold, tmp_path):
    """dataset_coco.json (filepath val2014/train2014, cocoid) with Portuguese as a COCO-style
    annotations JSON (CAPIVARA's MS-COCO-PT: image_id + caption), images in a COCO root."""
    coco = tmp_path / "coco"
    names = coco_names(gold["en"], train_share=0.5)
    write_coco(world_dir, gold["en"], names, coco, "2014")
    rows = [
        {
            "filepath": name.split("_")[1],
            "filename": name,
            "cocoid": i + 1,
            "split": "test",
            "sentences": [{"raw": c} for c in r["captions"]],
        }
        for i, (r, name) in enumerate(zip(gold["en"], names, strict=True))
    ]
    rows.append({**rows[0], "split": "restval", "cocoid": 10**6})  # not the test split
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": rows, "dataset": "coco"}))
    annotations = [
        {"image_id": i + 1, "id": 10 * i + k, "caption": c}
        for i, r in enumerate(gold["pt"])
        for k, c in enumerate(r["captions"])
    ]
    (tmp_path / "captions_pt.json").write_text(json.dumps({"annotations": annotations}))
    spec = f"karpathy:{tmp_path / 'dataset_coco.json'},test,images={coco},pt=captions_pt.json"
    data = load_eval_data(spec, ["en", "pt"])
    assert_same(data, world(world_dir, ["en", "pt"]), ["en", "pt"])
    assert data.name == "karpathy-coco" and data.info["missing_images"] == 0
    assert len(data.texts["pt"]) == len(annotations)


# ------------------------------------------------------------------ manifests


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest(world_dir, gold, tmp_path, fmt):
    rows = []
    for lang in ("en", "pt"):
        for row in gold[lang]:
            rows += [
                {"image": row["image_path"], "caption": c, "language": lang, "split": "test"}
                for c in row["captions"]
            ]
    rows.insert(
        3, {"image": "images/train/x.png", "caption": "c", "language": "en", "split": "train"}
    )
    # images laid out as the world has them, the manifest next to them
    for row in gold["en"]:
        copy_image(world_dir, row, tmp_path / row["image_path"])
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    data = load_eval_data(f"manifest:{path}", ["en", "pt"])
    assert_same(data, world(world_dir, ["en", "pt"]), ["en", "pt"])
    assert data.info["missing_images"] == 0  # the train row is another split: not read


def test_manifest_refuses_paths_outside_its_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    manifest = tmp_path / "m" / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": "../secret.png", "caption": "c", "lang": "en"}))
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        load_eval_data(f"manifest:{manifest}", ["en"])
    manifest.write_text(json.dumps({"image": str(tmp_path / "secret.png"), "caption": "c"}))
    with pytest.raises(DatasetError, match="needs an image path"):
        load_eval_data(f"manifest:{manifest}", ["en"])  # no language column, no lang=
    with pytest.raises(DatasetError, match="must be relative"):
        load_eval_data(f"manifest:{manifest},lang=en", ["en"])


def test_spec_split_and_options():
    assert split_options("/d/xm3600") == ("/d/xm3600", None, {})
    assert split_options("/d/f.json,test,images=/x") == ("/d/f.json", "test", {"images": "/x"})
    assert split_options("/d/f.json,images=/x,val") == ("/d/f.json", "val", {"images": "/x"})
    assert split_options("a.parquet,b.parquet") == ("a.parquet,b.parquet", None, {})
    assert split_options("/w,val") == ("/w", "val", {})


# ------------------------------------------------------------------ shards and their origins


def test_shards_by_caption_origin(world_dir, gold, tmp_path):
    """shards: reads gold captions, shards[source]: the English alt-text (origin source),
    shards[*]: every origin, shards[gold,source]: both named; an unknown origin is refused."""
    from babelcap.world.load import load_manifest
    from babelcap.world.shards import write_world_shards

    out = tmp_path / "shards"
    write_world_shards(world_dir, out, ["en", "pt"], split="test", with_alt_text=True)
    alt = {r["image_path"]: r["caption"] for r in load_manifest(world_dir, "test")}
    alt_texts = [alt[r["image_path"]] for r in gold["en"]]
    n = len(gold["en"])

    plain = load_eval_data(f"shards:{out}", ["en", "pt"])
    ref = world(world_dir, ["en", "pt"])
    assert plain.image_ids == ref.image_ids and plain.texts == ref.texts

    source = load_eval_data(f"shards[source]:{out}", ["en", "pt"])
    assert source.image_ids == ref.image_ids
    assert source.texts == {"en": alt_texts, "pt": []}
    assert source.text_to_image["en"] == list(range(n))

    every = load_eval_data(f"shards[*]:{out}", None)  # every origin and every language
    assert list(every.texts) == ["en", "pt"] and every.image_ids == ref.image_ids
    want_en = [c for a, r in zip(alt_texts, gold["en"], strict=True) for c in [a, *r["captions"]]]
    assert every.texts["en"] == want_en and every.texts["pt"] == ref.texts["pt"]
    named = load_eval_data(f"shards[gold,source]:{out}", ["en"])
    assert named.texts["en"] == want_en
    with pytest.raises(ValueError, match="unknown caption origin"):
        load_eval_data(f"shards[nope]:{out}", ["en"])


# ------------------------------------------------------------------ the CLI, end to end


def test_eval_languages_default_to_the_datasets_own(world_dir):
    """No --languages: every language the dataset has (None to the readers), and for a world,
    whose reader needs them named, the languages its world.json lists."""
    import argparse

    from babelcap.commands import eval as eval_command
    from babelcap.world.build import world_meta

    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", "m", "--dataset", "xm3600:/d"])
    assert args.languages is None
    assert eval_command.dataset_languages("xm3600:/d,captions=all") is None
    assert eval_command.dataset_languages("shards[*]:out") is None
    want = world_meta(world_dir)["languages"]
    assert eval_command.dataset_languages(f"world:{world_dir},val") == want
    assert len(want) >= 2


def test_eval_cli_on_xm3600_layout(world_dir, world_models, gold, tmp_path):
    clip = world_models("clip-base")["clip-base"]
    root = write_xm3600(world_dir, gold, tmp_path / "xm3600")
    cache = tmp_path / "emb"

    def run(out: Path, flag: str = "--dataset", languages: str | None = "en,pt") -> dict:
        cmd = [sys.executable, "-m", "babelcap.cli", "eval", flag, f"xm3600:{root}"]
        cmd += ["--languages", languages] if languages else []
        cmd += ["--model", f"base={clip}", "--out", str(out)]
        cmd += ["--tie-rule", "clip_benchmark", "--embedding-cache", str(cache)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "across languages" in done.stdout
        # the image the captions list but the folder lacks is said, not lost silently
        assert "1 images listed by" in done.stdout
        return json.loads((out / "results.json").read_text())

    first = run(tmp_path / "r1")["base"]
    assert first["dataset"] == "xm3600" and first["tie_rule"] == "clip_benchmark"
    assert first["reader"]["missing_images"] == 1
    assert first["contamination"]["checked"] and first["contamination"]["total"] == 0
    assert first["languages"]["pt"]["captions"] == len(gold["pt"])
    spread = first["summary"]["mean_recall"]["spread"]
    means = [first["languages"][lang]["mean_recall"] for lang in ("en", "pt")]
    assert spread == pytest.approx(max(means) - min(means))
    # CLIP_benchmark's layout: one JSON object per file, named as its eval names them
    files = sorted((tmp_path / "r1" / "clip_benchmark").glob("*.json"))
    records = [json.loads(f.read_text()) for f in files]
    assert [(r["dataset"], r["language"], r["task"]) for r in records] == [
        ("crossmodal3600", "en", "zeroshot_retrieval"),
        ("crossmodal3600", "pt", "zeroshot_retrieval"),
    ]
    for file, r in zip(files, records, strict=True):
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(r)
        assert file.name.startswith("crossmodal3600_") and file.name.endswith(
            f"_{r['model']}_{r['language']}_zeroshot_retrieval.json"
        )
    assert records[1]["metrics"]["image_retrieval_recall@5"] == pytest.approx(
        first["languages"]["pt"]["t2i_r5"] / 100
    )
    cached = sorted(p.name.rsplit("-", 1)[0] for p in cache.rglob("*.npy"))
    assert cached == ["images", "texts-en", "texts-pt"]  # one model folder, one entry each
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    # --data, and no --languages: every language of the file (en, pt from the cache, de new)
    again = run(tmp_path / "r2", "--data", languages=None)["base"]
    assert list(again["languages"]) == ["de", "en", "pt"]
    assert {k: again["languages"][k] for k in ("en", "pt")} == first["languages"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    added = {p.name.rsplit("-", 1)[0] for p in cache.rglob("*.npy")} - set(cached)
    assert added == {"texts-de"}


# ------------------------------------------------------------------ zero-shot from data files


def write_imagefolder(world_dir: Path, root: Path, languages=("en", "pt")) -> int:
    """The world's single-object test images in one folder per shape, class names per language
    from the world's lexicon and its templates, as data files; returns the image count."""
    from babelcap.world.eval_data import zero_shot_config
    from babelcap.world.lexicon import class_names
    from babelcap.world.load import load_scenes
    from babelcap.world.scene import SHAPES

    n = 0
    for shape in SHAPES:  # every class, as the world's task has them, even without images
        (root / "test" / shape).mkdir(parents=True, exist_ok=True)
    for row in load_scenes(world_dir, "test"):
        if len(row["scene"].objects) == 1:
            shape = row["scene"].objects[0].shape
            copy_image(world_dir, row, root / "test" / shape / Path(row["image_path"]).name)
            n += 1
    keys = sorted(p.name for p in (root / "test").iterdir())
    names = {lang: [class_names(lang)["shape"][k] for k in keys] for lang in languages}
    (root / "classnames.json").write_text(json.dumps(names, ensure_ascii=False))
    templates = {lang: zero_shot_config()["templates"][lang] for lang in languages}
    (root / "templates.json").write_text(json.dumps(templates, ensure_ascii=False))
    return n


def test_imagefolder_reads_classes_and_templates_from_data_files(world_dir, tmp_path):
    n = write_imagefolder(world_dir, tmp_path / "shapes")
    data = load_eval_data(f"imagefolder:{tmp_path / 'shapes'},task=shape", ["en", "pt"])
    task = data.zero_shot["shape"]
    assert len(data.images) == len(task.labels) == n > 0 and data.texts == {"en": [], "pt": []}
    keys = sorted(p.name for p in (tmp_path / "shapes" / "test").iterdir())
    filled = [i for i, k in enumerate(keys) if any((tmp_path / "shapes" / "test" / k).iterdir())]
    first = sorted((tmp_path / "shapes" / "test" / keys[filled[0]]).iterdir())[0]
    assert data.images[0] == first and task.labels[0] == filled[0]
    assert task.labels == sorted(task.labels) and task.labels[-1] == filled[-1]
    # a language without templates in the dataset gets the shipped defaults (data too)
    (tmp_path / "shapes" / "classnames.json").write_text(
        json.dumps({k: {"en": k, "fr": k} for k in keys})
    )
    fr = load_eval_data(f"imagefolder:{tmp_path / 'shapes'}", ["fr"]).zero_shot["classes"]
    assert fr.templates["fr"][0] == "une photo de {c}." and fr.classes["fr"] == keys
    with pytest.raises(DatasetError, match="names in 'de'"):
        load_eval_data(f"imagefolder:{tmp_path / 'shapes'}", ["de"])


def test_imagefolder_zero_shot_equals_the_worlds_task(world_dir, world_models, tmp_path):
    from babelcap.models.clip import load_clip
    from babelcap.training.evaluate import evaluate

    bundle = load_clip(str(world_models("clip-base")["clip-base"]))
    write_imagefolder(world_dir, tmp_path / "shapes")
    folder = load_eval_data(f"imagefolder:{tmp_path / 'shapes'},task=shape", ["en", "pt"])
    got = evaluate(bundle, folder, training_images=None)["languages"]
    want = evaluate(bundle, world(world_dir, ["en", "pt"]), training_images=None)["languages"]
    for lang in ("en", "pt"):
        assert got[lang]["zs_shape"] == pytest.approx(want[lang]["zs_shape"])
        assert "t2i_r1" not in got[lang]  # no captions: classification only
