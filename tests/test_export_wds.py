"""`babelcap export-wds`: caption choice, splits, links, safe names, skips and folder ownership,
on real shards (written through the contract) with the test world's images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from babelcap.cli import main
from babelcap.core import schema
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
        assert meta["source_uri"] == f"{key[:8]}.png"  # no absolute path of this machine
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
