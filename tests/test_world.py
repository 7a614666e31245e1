"""The synthetic world: determinism, splits, grammar agreement, captions that match the images."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from babelcap.world import lexicon as lx
from babelcap.world.build import ALT_TEXT_KINDS, build_world
from babelcap.world.corpus import monolingual, parallel_pairs
from babelcap.world.grammar import (
    LANGUAGES,
    NUM_VARIANTS,
    class_names,
    describe,
    describe_all,
    tokens,
    vocabulary_words,
    word_forms,
)
from babelcap.world.load import load_gold, load_manifest, load_scenes
from babelcap.world.scene import (
    COLOURS,
    SHAPES,
    Background,
    Obj,
    Scene,
    region,
    relation_of,
    render,
    sample_scene,
)

BG = Background("flat", (128, 128, 128), (128, 128, 128), 0)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, n_images=60, seed=3, workers=1, progress=False)
    return out


def _scenes(n: int = 300, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def one(shape: str, colour: str, size: str = "big") -> Scene:
    return Scene((Obj(shape, colour, size, 0.25, 0.5),), BG)


def pair(a: tuple[str, str, str], b: tuple[str, str, str], rel: str = "left") -> Scene:
    return Scene((Obj(*a, 0.2, 0.5), Obj(*b, 0.8, 0.5)), BG, rel)


def group_of(kind: tuple[str, str, str], n: int, other=("square", "blue", "small")) -> Scene:
    objs = [Obj(*kind, 0.2 + 0.3 * i, 0.3) for i in range(n)] + [Obj(*other, 0.5, 0.8)]
    return Scene(tuple(objs), BG)


# --- determinism and layout --------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_images(small_world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_world(again, n_images=60, seed=3, workers=2, progress=False)  # pool path, same bytes
    assert _files(small_world) == _files(again)

    other = tmp_path / "other"
    build_world(other, n_images=60, seed=4, workers=1, progress=False)
    a, b = _files(small_world), _files(other)
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 60
    differing = sum(a[k] != b[k] for k in pngs)
    assert differing >= 55


def test_layout_splits_and_rows(small_world: Path) -> None:
    meta = json.loads((small_world / "world.json").read_text())
    assert meta["counts"] == {"train": 48, "val": 6, "test": 6}
    assert meta["languages"] == list(LANGUAGES)
    manifest = load_manifest(small_world)
    assert len(manifest) == 60
    by_split: dict[str, set[str]] = {}
    for row in manifest:
        assert set(row) == {"image_path", "caption", "language", "split"}
        assert row["language"] == "en"
        assert row["image_path"].startswith(f"images/{row['split']}/")
        assert (small_world / row["image_path"]).is_file()
        by_split.setdefault(row["split"], set()).add(row["image_path"])
    assert {k: len(v) for k, v in by_split.items()} == meta["counts"]
    train, val, test = by_split["train"], by_split["val"], by_split["test"]
    assert not (train & val or train & test or val & test)
    assert len(list((small_world / "images").rglob("*.png"))) == 60

    en = load_gold(small_world, "en")
    for lang in LANGUAGES:
        gold = load_gold(small_world, lang)
        assert [g["image_path"] for g in gold] == [m["image_path"] for m in manifest]
        assert all(len(g["captions"]) == NUM_VARIANTS for g in gold)
        assert len(load_gold(small_world, lang, split="val")) == 6
    # Clean alt-text is one of the English gold paraphrases of the same image; noisy alt-text
    # (the scenes file says which) is not.
    kinds = [s["alt_text"] for s in load_scenes(small_world)]
    for m, g, kind in zip(manifest, en, kinds, strict=True):
        assert (m["caption"] in g["captions"]) == (kind == "clean"), (kind, m["caption"])
    assert set(kinds) == set(ALT_TEXT_KINDS)
    assert len({m["caption"] for m in manifest}) > 30


def test_alt_text_noise_share(tmp_path: Path) -> None:
    shares = {}
    for noise in (0.0, 0.5, 1.0):
        build_world(tmp_path / str(noise), 400, seed=1, alt_text_noise=noise, progress=False)
        kinds = [s["alt_text"] for s in load_scenes(tmp_path / str(noise))]
        shares[noise] = 1 - kinds.count("clean") / len(kinds)
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0
    assert 0.4 < shares[0.5] < 0.6
    # The noise touches the alt-text alone: images and gold captions are the same.
    a, b = _files(tmp_path / "0.0"), _files(tmp_path / "1.0")
    assert {k for k in a if a[k] != b[k]} == {"world.json", "manifest.jsonl", "scenes.jsonl"}
    with pytest.raises(ValueError, match="alt_text_noise"):
        build_world(tmp_path / "bad", 10, alt_text_noise=1.5, progress=False)


def test_png_is_the_rendered_scene(small_world: Path) -> None:
    for row in load_scenes(small_world, split="test"):
        on_disk = Image.open(small_world / row["image_path"])
        assert on_disk.mode == "RGB" and on_disk.size == (64, 64)
        assert on_disk.tobytes() == render(row["scene"], 64).tobytes()


def test_scene_round_trip() -> None:
    for scene in _scenes(50):
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


# --- scenes and images ---------------------------------------------------------------------------


def test_scene_sampling_covers_the_world_and_is_geometrically_true() -> None:
    scenes = _scenes(2000)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    assert len({s.background.rgb for s in scenes}) >= 8
    assert {s.background.kind for s in scenes} == {"flat", "gradient", "noise"}
    counts = 0
    for s in scenes:
        objs = s.objects
        for i, a in enumerate(objs):  # inside the image, not overlapping
            assert a.radius <= a.x <= 1 - a.radius and a.radius <= a.y <= 1 - a.radius
            for b in objs[i + 1 :]:
                assert math.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius
        if len(objs) == 2:
            assert s.relation is not None and relation_of(*objs) == s.relation
            assert objs[0].kind != objs[1].kind
        else:
            assert s.relation is None
        if len(objs) == 3 and len({o.kind for o in objs}) < 3:
            counts += 1
    assert counts > 100  # "two red circles and ..." occurs often


def test_render_puts_the_colours_where_the_objects_are() -> None:
    size = 64
    for scene in _scenes(200, seed=1):
        image = render(scene, size)
        assert image.mode == "RGB" and image.size == (size, size)
        for obj in scene.objects:
            px = image.getpixel((int(obj.x * size), int(obj.y * size)))
            assert math.dist(px, COLOURS[obj.colour]) < 30, (scene, obj, px)
        corner = image.getpixel((0, 0))  # never covered by an object
        for obj in scene.objects:
            assert math.dist(corner, COLOURS[obj.colour]) > 60, (scene, corner)

    # Size words mean something in pixels: a big object covers far more than a small one.
    def area(size_word: str) -> int:
        img = render(Scene((Obj("circle", "red", size_word, 0.5, 0.5),), BG), size)
        pixels = np.asarray(img, dtype=np.float32).reshape(-1, 3)
        return int((np.linalg.norm(pixels - COLOURS["red"], axis=1) < 60).sum())

    assert area("big") > 3 * area("small")


# --- captions ------------------------------------------------------------------------------------


def _mentioned(caption: str, forms: dict[str, set[str]]) -> list[str]:
    return [c for t in tokens(caption) for c, fs in forms.items() if t in fs]


@pytest.mark.parametrize("lang", LANGUAGES)
def test_captions_name_exactly_the_scene(lang: str, small_world: Path) -> None:
    forms = word_forms(lang)
    scenes = [r["scene"] for r in load_scenes(small_world)] + _scenes(300, seed=2)
    gold = load_gold(small_world, lang)
    for i, scene in enumerate(scenes):
        captions = describe_all(scene, lang)
        if i < len(gold):
            assert gold[i]["captions"] == captions
        groups = {o.kind for o in scene.objects}
        for cap in captions:
            shapes = _mentioned(cap, forms["shape"])
            assert sorted(shapes) == sorted(k[0] for k in groups), (cap, scene)
            assert sorted(_mentioned(cap, forms["colour"])) == sorted(k[1] for k in groups), cap
            assert sorted(_mentioned(cap, forms["size"])) == sorted(k[2] for k in groups), cap


@pytest.mark.parametrize("lang", LANGUAGES)
def test_variants_differ_and_look_like_alt_text(lang: str) -> None:
    for scene in _scenes(400, seed=5):
        captions = describe_all(scene, lang)
        assert len(captions) == NUM_VARIANTS == len(set(captions)), captions
        for cap in captions:
            assert 3 <= len(tokens(cap)) < 25
            assert cap == cap.strip() and not cap.endswith(".")
            assert cap[0] == cap[0].lower()
            if lang != "de":  # German nouns keep their capitals
                assert cap == cap.lower()
            assert set(tokens(cap)) <= vocabulary_words(lang)
    with pytest.raises(ValueError):
        describe(scene, lang, NUM_VARIANTS)


def test_english_templates() -> None:
    s = Scene((Obj("circle", "red", "big", 0.2, 0.5),), BG)
    assert describe(s, "en", 0) == "a big red circle on the left"
    assert describe(s, "en", 1) == "a photo of a big red circle"
    s2 = pair(("square", "blue", "small"), ("star", "red", "big"), "left")
    assert describe(s2, "en", 0) == "a small blue square to the left of a big red star"
    assert describe(s2, "en", 5) == "an image of a big red star to the right of a small blue square"
    s3 = group_of(("triangle", "green", "small"), 2)
    assert describe(s3, "en", 0) == "two small green triangles and a small blue square"
    assert describe(s3, "en", 4).startswith("there are two")


def test_portuguese_agreement() -> None:
    assert describe(one("circle", "red"), "pt", 1) == "uma foto de um círculo vermelho grande"
    assert describe(one("star", "red", "small"), "pt", 4) == "há uma estrela vermelha pequena"
    two_stars = group_of(("star", "red", "small"), 2)
    assert describe(two_stars, "pt", 0).startswith("duas estrelas vermelhas pequenas e ")
    two_circles = group_of(("circle", "white", "big"), 2)
    assert describe(two_circles, "pt", 0).startswith("dois círculos brancos grandes e ")
    crosses = group_of(("cross", "blue", "big"), 3)
    assert describe(crosses, "pt", 0).startswith("três cruzes azuis grandes")
    orange = group_of(("drop", "orange", "small"), 2)  # colour nouns stay invariant
    assert describe(orange, "pt", 0).startswith("duas gotas laranja pequenas")
    rel = pair(("square", "blue", "small"), ("star", "red", "big"), "left")
    assert (
        describe(rel, "pt", 0)
        == "um quadrado azul pequeno à esquerda de uma estrela vermelha grande"
    )


def test_spanish_agreement() -> None:
    assert (
        describe(one("star", "red", "small"), "es", 0) == "una estrella roja pequeña a la izquierda"
    )
    assert describe(one("circle", "black"), "es", 4) == "hay un círculo negro grande"
    assert describe(group_of(("cross", "blue", "big"), 2), "es", 0).startswith(
        "dos cruces azules grandes y "
    )
    assert describe(group_of(("drop", "yellow", "small"), 2), "es", 0).startswith(
        "dos gotas amarillas pequeñas y "
    )
    assert describe(group_of(("triangle", "white", "small"), 3), "es", 0).startswith(
        "tres triángulos blancos pequeños"
    )


def _romance_agreement(lang: str) -> None:
    """Every noun phrase: number word, noun, colour, size all agree in gender and number."""
    shapes, colours, sizes, numbers = {
        "pt": (lx.PT_SHAPES, lx.PT_COLOURS, lx.PT_SIZES, lx.PT_NUMBERS),
        "es": (lx.ES_SHAPES, lx.ES_COLOURS, lx.ES_SIZES, lx.ES_NUMBERS),
    }[lang]
    noun_slot = {}
    for gender, sg, pl in shapes.values():
        g = 0 if gender == "m" else 1
        noun_slot[sg], noun_slot[pl] = g, g + 2
    checked = 0
    for scene in _scenes(300, seed=9):
        for cap in describe_all(scene, lang):
            words = tokens(cap)
            for i, w in enumerate(words):
                if w not in noun_slot:
                    continue
                slot = noun_slot[w]
                colour, size = words[i + 1], words[i + 2]
                assert any(f[slot] == colour for f in colours.values()), (cap, w, colour)
                assert any(f[slot] == size for f in sizes.values()), (cap, w, size)
                n = 1 if slot < 2 else None
                allowed = (
                    {numbers[1][slot % 2]} if n else {numbers[2][slot % 2], numbers[3][slot % 2]}
                )
                assert words[i - 1] in allowed, (cap, w, words[i - 1])
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize("lang", ["pt", "es"])
def test_romance_agreement_everywhere(lang: str) -> None:
    _romance_agreement(lang)


def test_german_gender_and_case() -> None:
    assert describe(one("circle", "red"), "de", 0) == "ein großer roter Kreis links"
    assert describe(one("triangle", "red"), "de", 0) == "ein großes rotes Dreieck links"
    assert describe(one("diamond", "red"), "de", 0) == "eine große rote Raute links"
    # accusative after "es gibt" / "die ... zeigt"; dative after "von".
    assert describe(one("circle", "blue", "small"), "de", 4) == "es gibt einen kleinen blauen Kreis"
    assert (
        describe(one("diamond", "blue"), "de", 3)
        == "eine Abbildung, die eine große blaue Raute zeigt"
    )
    assert describe(one("diamond", "blue"), "de", 1) == "ein Foto von einer großen blauen Raute"
    assert (
        describe(one("cross", "orange"), "de", 1)
        == "ein Foto von einem großen orangefarbenen Kreuz"
    )
    rel = pair(("square", "blue", "small"), ("star", "red", "big"), "left")
    assert describe(rel, "de", 0) == "ein kleines blaues Quadrat links von einem großen roten Stern"
    above = pair(("drop", "black", "big"), ("diamond", "white", "small"), "above")
    assert (
        describe(above, "de", 0) == "ein großer schwarzer Tropfen über einer kleinen weißen Raute"
    )
    two = group_of(("circle", "red", "small"), 2)
    assert describe(two, "de", 0).startswith(
        "zwei kleine rote Kreise und ein kleines blaues Quadrat"
    )
    assert describe(two, "de", 1).startswith("ein Foto von zwei kleinen roten Kreisen und einem ")


def test_hindi_inflection() -> None:
    assert describe(one("circle", "blue"), "hi", 4) == "एक बड़ा नीला वृत्त है"
    assert describe(one("drop", "blue"), "hi", 4) == "एक बड़ी नीली बूँद है"  # feminine
    assert describe(one("drop", "red", "small"), "hi", 4) == "एक छोटी लाल बूँद है"  # लाल invariant
    assert describe(one("star", "green"), "hi", 1) == "एक बड़े हरे तारे की फ़ोटो"  # oblique
    stars = group_of(("star", "yellow", "big"), 2)
    assert describe(stars, "hi", 0).startswith("दो बड़े पीले तारे और एक छोटा नीला वर्ग")
    assert describe(stars, "hi", 4).endswith(" हैं")  # plural copula
    drops = group_of(("drop", "black", "small"), 3)
    assert describe(drops, "hi", 0).startswith("तीन छोटी काली बूँदें")
    assert describe(drops, "hi", 1).startswith("तीन छोटी काली बूँदों")
    rel = pair(("square", "white", "small"), ("star", "black", "big"), "left")
    assert describe(rel, "hi", 0) == "एक बड़े काले तारे के बाईं ओर एक छोटा सफ़ेद वर्ग"
    below = pair(("hexagon", "orange", "big"), ("circle", "purple", "small"), "below")
    assert describe(below, "hi", 0) == "एक छोटे बैंगनी वृत्त के नीचे एक बड़ा नारंगी षट्भुज"


def test_parallel_variants_keep_the_relation() -> None:
    rel = pair(("square", "blue", "small"), ("star", "red", "big"), "left")
    words = {"en": "left", "pt": "esquerda", "es": "izquierda", "de": "links", "hi": "बाईं"}
    flipped = {"en": "right", "pt": "direita", "es": "derecha", "de": "rechts", "hi": "दाईं"}
    for lang in LANGUAGES:
        caps = describe_all(rel, lang)
        assert all(words[lang] in c for c in caps[:5]) and flipped[lang] in caps[5], caps


def test_class_names_and_vocabulary() -> None:
    for lang in LANGUAGES:
        names = class_names(lang)
        assert set(names["shape"]) == set(SHAPES) and set(names["colour"]) == set(COLOURS)
        assert len(set(names["shape"].values())) == len(SHAPES)
        vocab = vocabulary_words(lang)
        assert set(names["shape"].values()) <= vocab
    assert class_names("pt")["shape"]["star"] == "estrela"
    assert class_names("de")["colour"]["red"] == "rot"
    assert class_names("hi")["colour"]["blue"] == "नीला"
    with pytest.raises(ValueError):
        class_names("xx")


def test_single_object_regions_match_the_caption() -> None:
    for scene in _scenes(500, seed=11):
        if len(scene.objects) == 1:
            where = region(scene.objects[0])
            place = {
                "left": "on the left",
                "right": "on the right",
                "top": "at the top",
                "bottom": "at the bottom",
                "middle": "in the middle",
            }[where]
            assert describe(scene, "en", 0).endswith(place)


# --- corpora and CLI -----------------------------------------------------------------------------


def test_parallel_corpus() -> None:
    pairs = parallel_pairs(50, seed=1, src="en", tgt="pt")
    assert pairs == parallel_pairs(50, seed=1, src="en", tgt="pt")
    assert pairs != parallel_pairs(50, seed=2, src="en", tgt="pt")
    assert len(pairs) == 50 and all(s != t for s, t in pairs)
    full = parallel_pairs(5, seed=1, src="de", tgt="hi", all_variants=True)
    assert len(full) == 5 * NUM_VARIANTS
    assert len(set(monolingual(40, seed=0, lang="es"))) > 20
    with pytest.raises(ValueError):
        parallel_pairs(1, 0, "en", "xx")


def test_cli_world_build(tmp_path: Path, capsys) -> None:
    from babelcap.cli import main

    out = tmp_path / "cli-world"
    argv = [
        "world",
        "build",
        "--out",
        str(out),
        "--images",
        "20",
        "--seed",
        "1",
        "--languages",
        "en,pt,hi",
        "--size",
        "48",
    ]
    assert main(argv) == 0
    assert "20 images" in capsys.readouterr().out
    meta = json.loads((out / "world.json").read_text())
    assert meta["languages"] == ["en", "pt", "hi"] and meta["image_size"] == 48
    assert sorted(p.name for p in (out / "gold").iterdir()) == ["en.jsonl", "hi.jsonl", "pt.jsonl"]
    first = _files(out)
    assert main(argv) == 0
    assert _files(out) == first
    assert main(["world", "build", "--out", str(tmp_path / "bad"), "--languages", "en,xx"]) == 2


# --- one "is this world built" check, the world as an evaluation dataset ----------------------


def test_ensure_world_reuses_a_matching_world_and_rebuilds_another(tmp_path: Path) -> None:
    from babelcap.world.build import ensure_world, is_built

    out = tmp_path / "w"
    assert not is_built(out, n_images=12, seed=1)
    assert ensure_world(out, n_images=12, seed=1, progress=False) == out
    stamp = (out / "world.json").stat().st_mtime_ns
    assert is_built(out, n_images=12, seed=1)
    assert is_built(out, n_images=12, seed=1, languages=LANGUAGES, image_size=64)  # defaults
    ensure_world(out, n_images=12, seed=1, workers=2, progress=False)  # workers: same bytes
    assert (out / "world.json").stat().st_mtime_ns == stamp
    for other in ({"seed": 2}, {"image_size": 32}, {"languages": ("en", "pt")}):
        assert not is_built(out, **{"n_images": 12, "seed": 1, **other}), other
    ensure_world(out, n_images=12, seed=2, progress=False)
    assert json.loads((out / "world.json").read_text())["seed"] == 2


def test_world_eval_data(small_world: Path, tmp_path: Path) -> None:
    import hashlib

    from babelcap.training.eval_data import load_eval_data
    from babelcap.world.shards import write_world_shards

    data = load_eval_data(f"world:{small_world}", ["en", "pt"], "test", max_captions=2)
    gold = load_gold(small_world, "pt", "test")
    assert len(data.images) == len(gold) and data.images[0].mode == "RGB"
    assert data.image_ids == [
        hashlib.sha256((small_world / r["image_path"]).read_bytes()).hexdigest() for r in gold
    ]
    assert data.texts["pt"][:2] == gold[0]["captions"][:2]
    assert len(data.texts["en"]) == 2 * len(gold) and max(data.text_to_image["en"]) == len(gold) - 1
    # Zero-shot tasks: labels of single-object scenes, class names and templates per language.
    assert set(data.zero_shot) == {"shape", "colour"}
    shape = data.zero_shot["shape"]
    scenes = [r["scene"] for r in load_scenes(small_world, "test")]
    for label, scene in zip(shape.labels, scenes, strict=True):
        if len(scene.objects) == 1:
            assert shape.classes["en"][label] == class_names("en")["shape"][scene.objects[0].shape]
        else:
            assert label is None
    assert shape.classes["pt"] == [class_names("pt")["shape"][s] for s in SHAPES]
    assert data.zero_shot["colour"].classes["en"] == list(COLOURS)
    assert all("{}" in t for t in shape.templates["pt"])
    assert len(load_eval_data(f"world:{small_world}", ["en"], None, max_images=5).images) == 5

    # The same images through shards: the same ids (the shards' image_id) and captions.
    write_world_shards(small_world, tmp_path / "s", ["en", "pt"], split="test")
    for spec in (str(tmp_path / "s"), f"shards:{tmp_path / 's'}"):
        via_shards = load_eval_data(spec, ["en", "pt"], "test", max_captions=2)
        assert via_shards.image_ids == data.image_ids
        assert via_shards.texts == data.texts and via_shards.zero_shot == {}
    with pytest.raises(ValueError, match=r"known: .*shards, world"):
        load_eval_data("nope:x", ["en"])


def test_results_table_has_a_column_per_zero_shot_task() -> None:
    from babelcap.training.evaluate import to_markdown

    row = {"mean_recall": 50.0, "zs_shape": 40.0, "zs_texture": 30.0}
    table = to_markdown({"m": {"languages": {"en": row}}})
    assert "| language | model | mean_recall | zs_shape | zs_texture |" in table
    assert "| en | m | 50.0 | 40.0 | 30.0 |" in table
