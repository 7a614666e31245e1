"""`babelcap export-wds`: caption choice, splits, links, safe names, skips and folder ownership,
on real shards (written through the contract) with the test world's images."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from babelcap.cli import main
from babelcap.core import schema
from babelcap.core.paths import portable_ref
from babelcap.core.shards import write_shard
from babelcap.pipelines.export_wds import (
    ExportError,
    WdsExportConfig,
    choose_caption,
    export_webdataset,
    safe_key,
)

C = schema.caption


def _png(colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def _captions() -> list[dict]:
    """Alt-text (low CLIP score) and two synthetic captions, each translated into pt."""
    return [
        C("stock image", "en", "source", score=0.05),
        C("a red star", "en", "synthetic", score=0.31),
        C("a big red star", "en", "synthetic", score=0.42),
        C("imagem de banco", "pt", "translated", source_index=0),
        C("uma estrela vermelha", "pt", "translated", source_index=1),
        C("uma estrela vermelha grande", "pt", "translated", source_index=2),
    ]


def _row(image_id: str, data: bytes | None, split: str | None = "train", caps=None) -> dict:
    return {
        "image_id": image_id,
        "source_uri": f"/home/someone/photos/{image_id[:8]}.png",
        "split": split,
        "image": {"bytes": data, "path": None},
        "width": None,
        "height": None,
        "captions": caps if caps is not None else _captions(),
    }


def _shards(root: Path, rows: list[dict]) -> Path:
    folder = root / "in"
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "part-0.parquet", rows)
    return folder


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _samples(out: Path) -> dict[str, dict]:
    """{key: {ext: bytes}} over the tars sizes.json lists."""
    sizes = json.loads((out / "sizes.json").read_text())
    found: dict[str, dict] = {}
    for name in sizes:
        for member, data in _members(out / name).items():
            key, ext = member.split(".", 1)
            found.setdefault(key, {})[ext] = data
    return found


def test_best_caption_is_the_best_scoring_translation_not_the_alt_text():
    caps = _captions()
    cfg = WdsExportConfig(language="pt")
    assert caps[choose_caption(caps, cfg)]["text"] == "uma estrela vermelha grande"
    # first: the first eligible one, which is the alt-text's translation (scored, 0.05)
    assert choose_caption(caps, cfg.updated({"caption_select": "first"})) == 3
    # an UNscored alt-text (and its translation) never wins while scored captions exist
    unscored = [dict(c) for c in caps]
    unscored[0]["score"] = None
    first = cfg.updated({"caption_select": "first"})
    assert choose_caption(unscored, first) == 4
    picks = {
        choose_caption(unscored, cfg.updated({"caption_select": "random", "seed": s}), "img")
        for s in range(30)
    }
    assert picks == {4, 5}  # seeded draws over the eligible ones only
    same = cfg.updated({"caption_select": "random", "seed": 3})
    assert choose_caption(unscored, same, "img") == choose_caption(unscored, same, "img")
    # origin filter: only synthetic English captions
    en_syn = WdsExportConfig(language="en", caption_origins="synthetic")
    assert choose_caption(caps, en_syn) == 2
    assert choose_caption(caps, WdsExportConfig(language="hi")) is None
    with pytest.raises(ValueError, match="unknown caption origin"):
        WdsExportConfig(language="pt", caption_origins="synthetic,alt")


def test_export_chooses_caption_selects_splits_and_keeps_links(tmp_path):
    rows = [
        _row("a" * 64, _png((255, 0, 0)), "train"),
        _row("b" * 64, _png((0, 255, 0)), "test"),
        _row("c" * 64, _png((0, 0, 255)), None),  # no split: always exported
    ]
    result = export_webdataset(_shards(tmp_path, rows), tmp_path / "wds", "pt", maxcount=2)
    assert result["written"] == 2 and result["splits_not_selected"] == {"test": 1}
    samples = _samples(tmp_path / "wds")
    assert sorted(samples) == ["a" * 64, "c" * 64]
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == "uma estrela vermelha grande"
        caps = meta["captions"]
        assert caps[meta["caption_index"]] == meta["caption"] and len(caps) == 6
        src = caps[meta["caption"]["source_index"]]
        assert src["text"] == "a big red star" and src["language"] == "en"
        assert meta["caption_score"] == pytest.approx(0.42)
        assert meta["source_uri"] == f"photos/{key[:8]}.png"  # no folders of this machine
        assert Image.open(io.BytesIO(sample["png"])).size == (8, 6)
    info = json.loads((tmp_path / "wds" / "_info.json").read_text())
    assert info["files"] == ["_info.json", "shard-000000.tar", "sizes.json"]
    assert info["config"]["splits"] == ["train"]

    every = export_webdataset(_shards(tmp_path, rows), tmp_path / "all", "pt", splits="all")
    assert every["written"] == 3


def test_crafted_ids_duplicates_and_non_images_are_skipped_or_made_safe(tmp_path):
    evil = "../../../../tmp/x.png"
    rows = [
        _row(evil, _png()),
        _row("d" * 64, _png((1, 2, 3))),
        _row("d" * 64, _png((1, 2, 3))),  # the same image twice
        _row("e" * 64, b"%PDF-1.4 not an image at all"),
        _row("f" * 64, None),
        _row("9" * 64, _png((0, 0, 0, 0), mode="RGBA")),  # transparent: babelcap's pixels
    ]
    out = tmp_path / "wds"
    result = export_webdataset(_shards(tmp_path, rows), out, "pt")
    assert result["written"] == 3
    assert result["skipped"] == {"duplicate_image_id": 1, "no_image": 1, "not_an_image": 1}
    assert result["keys_sanitised"] == 1
    names = list(_members(out / "shard-000000.tar"))
    assert all("/" not in n and ".." not in n and n.count(".") == 1 for n in names)
    key = safe_key(evil)
    assert key != safe_key("../../../../tmp/x_png") and f"{key}.json" in names
    with tarfile.open(out / "shard-000000.tar") as tar:
        tar.extractall(tmp_path / "x", filter="data")  # refuses escapes; none to refuse
    extracted = [p for p in (tmp_path / "x").rglob("*") if p.is_file()]
    assert len(extracted) == len(names) and {p.parent for p in extracted} == {tmp_path / "x"}
    rgba = Image.open(io.BytesIO(_samples(out)["9" * 64]["png"]))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    info = json.loads((out / "_info.json").read_text())
    assert info["skipped_examples"]["not_an_image"][0]["image_id"] == "e" * 64


def test_keys_are_unique_after_sanitising(tmp_path):
    """A crafted plain id equal to another id's sanitised key is skipped, never a second sample
    under the same key (issue 13 audit, G10)."""
    dotted = "photo.2024"
    taken = safe_key(dotted)  # photo_2024_<hash>, itself a plain id
    rows = [_row(dotted, _png((1, 0, 0))), _row(taken, _png((2, 0, 0))), _row("z" * 64, _png())]
    rows_reversed = [rows[1], rows[0], rows[2]]
    for i, order in enumerate((rows, rows_reversed)):
        out = tmp_path / f"wds{i}"
        result = export_webdataset(_shards(tmp_path / str(i), order), out, "pt")
        assert result["written"] == 2 and result["skipped"] == {"duplicate_key": 1}
        with tarfile.open(out / "shard-000000.tar") as tar:
            names = tar.getnames()
        assert len(names) == len(set(names)) == 6  # png, txt, json of two samples
        assert sorted(_samples(out)) == sorted([taken, "z" * 64])
        info = json.loads((out / "_info.json").read_text())
        skipped = info["skipped_examples"]["duplicate_key"][0]["image_id"]
        assert skipped == order[1]["image_id"]  # the later one is the one skipped


def test_portable_ref():
    assert portable_ref("Salesforce/blip-image-captioning-base") == (
        "Salesforce/blip-image-captioning-base"
    )
    assert portable_ref("gs://b/models/blip") == "gs://b/models/blip"
    assert portable_ref("relative/models/x") == "relative/models/x"
    assert portable_ref("/home/someone/models/blip-base") == "blip-base"
    assert portable_ref("/home/someone/models/blip-base/") == "blip-base"
    assert portable_ref("/srv/models/opus-mt-en-pt/ct2") == "opus-mt-en-pt/ct2"
    assert portable_ref("/srv/clip/text/") == "clip/text"
    assert portable_ref("file:///srv/models/opus-mt-en-pt/ct2") == "opus-mt-en-pt/ct2"
    assert portable_ref("/home/someone/data/in/part-0.parquet") == "in/part-0.parquet"
    assert portable_ref("/root/.cache/huggingface/hub/models--org--name/snapshots/0a1b") == (
        "org/name"
    )
    assert portable_ref("/") == "/"


def test_caption_models_carry_no_local_folders(tmp_path):
    caps = _captions()
    caps[1]["model"] = "/home/someone/work/models/blip-base"
    caps[2]["model"] = "Salesforce/blip-image-captioning-base"
    caps[4]["model"] = "/home/someone/work/models/opus-mt-en-pt/ct2"
    caps[5]["model"] = "/home/someone/work/models/opus-mt-en-pt/ct2/"
    out = tmp_path / "wds"
    export_webdataset(_shards(tmp_path, [_row("a" * 64, _png(), caps=caps)]), out, "pt")
    meta = json.loads(_samples(out)["a" * 64]["json"])
    models = [c.get("model") for c in meta["captions"]]
    assert models[1:3] == ["blip-base", "Salesforce/blip-image-captioning-base"]
    assert models[4:] == ["opus-mt-en-pt/ct2"] * 2 and meta["caption"]["model"] == models[5]
    assert "/home/" not in (out / "_info.json").read_text()
    assert not any("/home/" in (m or "") for m in models)


def test_stale_tars_are_not_listed_and_foreign_files_are_never_overwritten(tmp_path):
    rows = [_row(f"{i:064x}", _png((i, 0, 0))) for i in range(5)]
    src = _shards(tmp_path, rows)
    out = tmp_path / "wds"
    assert export_webdataset(src, out, "pt", maxcount=2)["tars"] == 3
    (out / "notes.txt").write_text("mine")
    again = export_webdataset(src, out, "pt", maxcount=10)
    assert again["tars"] == 1 and again["removed_stale"] == ["shard-000001.tar", "shard-000002.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 5}
    assert sorted(p.name for p in out.iterdir()) == [
        "_info.json",
        "notes.txt",
        "shard-000000.tar",
        "sizes.json",
    ]

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "shard-000000.tar").write_bytes(b"user data")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_webdataset(src, theirs, "pt")
    assert (theirs / "shard-000000.tar").read_bytes() == b"user data"
    assert sorted(p.name for p in theirs.iterdir()) == ["shard-000000.tar"]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "info",
    [
        {"files": ["shard-000000.tar"], "note": "mine"},  # a user's _info.json: no format
        {"format": "something else 1", "files": []},
        [1, 2, 3],
        "not json {",
        {"format": "babelcap export-wds 1", "config": {"prefix": "shard"}, "files": ["../v.tar"]},
        {"format": "babelcap export-wds 1", "config": {"prefix": "shard"}, "files": ["{abs}"]},
        {"format": "babelcap export-wds 1", "config": {"prefix": "shard"}, "files": ["mine.tar"]},
        {"format": "babelcap export-wds 1", "config": {"prefix": "shard"}, "files": ["notes.txt"]},
        {"format": "babelcap export-wds 1", "config": {"prefix": "../x"}, "files": []},
        {"format": "babelcap export-wds 1", "config": {"prefix": "shard"}, "files": "sizes.json"},
    ],
)
def test_an_info_json_babelcap_did_not_write_is_never_trusted(tmp_path, info):
    """export-wds believes an `_info.json` only when it carries the export's format and lists
    only names an export writes: otherwise it refuses the folder and changes nothing, inside
    or outside it (issue 13 audit, G1)."""
    src = _shards(tmp_path, [_row("a" * 64, _png())])
    outside = tmp_path / "v.tar"
    outside.write_bytes(b"victim")
    out = tmp_path / "wds"
    out.mkdir()
    for name in ("mine.tar", "notes.txt", "shard-000007.tar"):
        (out / name).write_bytes(b"mine")
    text = info if isinstance(info, str) else json.dumps(info).replace("{abs}", str(outside))
    (out / "_info.json").write_text(text)
    before = _tree(tmp_path)
    with pytest.raises(ExportError, match="not written by babelcap export-wds"):
        export_webdataset(src, out, "pt")
    assert _tree(tmp_path) == before


def test_an_export_removes_only_its_own_tars_and_never_writes_through_links(tmp_path):
    src = _shards(tmp_path, [_row(f"{i:064x}", _png((i, 0, 0))) for i in range(3)])
    out = tmp_path / "wds"
    assert export_webdataset(src, out, "pt", maxcount=1, prefix="a")["tars"] == 3
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    (out / "sizes.json").unlink()
    os.symlink(victim, out / "sizes.json")  # a link in place of the export's own file
    (out / "a-000002.tar").unlink()
    os.symlink(victim, out / "a-000002.tar")
    again = export_webdataset(src, out, "pt", maxcount=10, prefix="b")
    assert again["removed_stale"] == ["a-000000.tar", "a-000001.tar", "a-000002.tar"]
    assert victim.read_text() == "precious"  # links replaced or removed, never written through
    assert not (out / "sizes.json").is_symlink()
    assert json.loads((out / "sizes.json").read_text()) == {"b-000000.tar": 3}
    assert sorted(p.name for p in out.iterdir()) == ["_info.json", "b-000000.tar", "sizes.json"]


def test_cli_flags_come_from_the_config(tmp_path, capsys):
    rows = [_row("a" * 64, _png()), _row("b" * 64, _png((0, 9, 0)), "val")]
    src = _shards(tmp_path, rows)
    out = tmp_path / "wds"
    argv = ["export-wds", str(src), "--out", str(out), "--lang", "en"]
    assert main([*argv, "--caption-origin", "synthetic", "--splits", "train,val"]) == 0
    printed = capsys.readouterr().out
    assert "shard-{000000..000000}.tar" in printed and "--train-num-samples 2" in printed
    assert {s["txt"] for s in _samples(out).values()} == {b"a big red star"}
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([*argv, "--caption-select", "sometimes"])
    assert main([*argv, "--caption-origin", "alt"]) == 2  # clear error, no traceback
    assert "unknown caption origin" in capsys.readouterr().err
