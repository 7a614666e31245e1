"""Adding a language to a finished output (issue 14): translation only, existing captions kept
byte for byte, zero captioner and CLIP calls (counted by Beam's RunInference metrics of the
run), the rows otherwise unchanged. A tiny random translator (CTranslate2, pt and es) keeps it
fast; its output is gibberish, so the language and degenerate checks are off."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_publish import make_inputs

from babelcap.core.paths import portable_ref
from babelcap.core.shards import find_shards
from babelcap.pipelines.inspect import format_report, inspect_paths
from babelcap.pipelines.options import AugmentConfig, TextFilterConfig, TranslationStageConfig
from babelcap.pipelines.runner import ConfigMismatchError, run
from babelcap.translators import read_model_info

sys.path.insert(0, str(Path(__file__).parent / "data"))
import pipeline_testkit as kit


def _rows(out: Path) -> list[dict]:
    files = find_shards(out).files
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("image_id").to_pylist()


def test_add_a_language_translates_only(tmp_path):
    translator = kit.tiny_translator(tmp_path / "tr", languages=("pt", "es"))
    manifest = make_inputs(tmp_path / "in", 10)
    out = tmp_path / "out"

    def cfg(languages: str) -> AugmentConfig:
        return AugmentConfig(
            input=str(manifest),
            output=str(out),
            languages=languages,
            translator=TranslationStageConfig(
                model=str(translator), batch_size=8, options={"max_decoding_length": 12}
            ),
            text=TextFilterConfig(language_check=False, degenerate_check=False),
            unit_size=4,
        )

    run(cfg("pt"), workers=1, echo=False)
    before = _rows(out)
    assert all(any(c["language"] == "pt" for c in r["captions"]) for r in before)

    manifest_out = run(cfg("pt,es"), workers=1, echo=False)
    after = _rows(out)
    assert [r["image_id"] for r in after] == [r["image_id"] for r in before]
    for old, new in zip(before, after, strict=True):
        n = len(old["captions"])
        assert new["captions"][:n] == old["captions"]  # pt (and en) exactly as they were
        added = new["captions"][n:]
        assert added and {c["language"] for c in added} == {"es"}
        for c in added:
            src = new["captions"][c["source_index"]]
            assert src["language"] == "en" and src["origin"] != "translated"
        assert {k: v for k, v in new.items() if k != "captions"} == {
            k: v for k, v in old.items() if k != "captions"
        }
    metrics = manifest_out["metrics"]
    assert not [k for k in metrics if k.startswith(("babelcap.caption/", "babelcap.clip/"))]
    assert metrics["babelcap.translate/num_inferences"] == len(before)  # one call per row
    assert manifest_out["this_run"]["units"] == 3 and manifest_out["complete"]
    assert manifest_out["captions_per_language"]["es"] > 0
    # Only the new versions are on disk and read; a plain glob agrees.
    assert len(list(out.glob("data/*/*.parquet"))) == len(find_shards(out).files)
    assert all("-v1" in f for f in find_shards(out).files)

    # Removing a language is another configuration.
    with pytest.raises(ConfigMismatchError, match="languages"):
        run(cfg("es"), workers=1, echo=False)


def test_retranslate_one_language_with_another_translator(tmp_path):
    """A better translator for one language: --retranslate pt replaces the pt translations and
    keeps en and es byte for byte, with no captioning or CLIP; without the flag the run is
    refused naming the languages; new images are refused while es would mix two translators,
    until es is retranslated too; the same command again has nothing to do."""
    old_tr = kit.tiny_translator(tmp_path / "tr-a", languages=("pt", "es"))
    new_tr = kit.tiny_translator(tmp_path / "tr-b", languages=("pt", "es"), seed=1)
    manifest = make_inputs(tmp_path / "in", 10)
    out = tmp_path / "out"

    def cfg(translator: Path, **extra) -> AugmentConfig:
        return AugmentConfig(
            input=str(manifest),
            output=str(out),
            languages="pt,es",
            translator=TranslationStageConfig(
                model=str(translator), batch_size=8, options={"max_decoding_length": 12}
            ),
            text=TextFilterConfig(language_check=False, degenerate_check=False),
            unit_size=4,
            **extra,
        )

    def captions(rows: list[dict], language: str) -> list[list[dict]]:
        return [[c for c in r["captions"] if c["language"] == language] for r in rows]

    run(cfg(old_tr), workers=1, echo=False)
    before = _rows(out)
    with pytest.raises(ConfigMismatchError, match=r"differ for es; .*--retranslate es,pt\."):
        run(cfg(new_tr), workers=1, echo=False)
    with pytest.raises(ValueError, match="retranslate hi: not among the target languages"):
        cfg(new_tr, retranslate="hi")
    assert _rows(out) == before  # a refused run changes nothing

    manifest_out = run(cfg(new_tr, retranslate="pt"), workers=1, echo=False)
    after = _rows(out)
    assert [r["image_id"] for r in after] == [r["image_id"] for r in before]
    assert captions(after, "en") == captions(before, "en")
    assert captions(after, "es") == captions(before, "es")  # es untouched, byte for byte
    assert captions(after, "pt") != captions(before, "pt")
    new_id = read_model_info(new_tr).model_id
    assert {c["model"] for caps in captions(after, "pt") for c in caps} == {new_id}
    for row in after:
        for c in row["captions"]:
            if c["origin"] == "translated":
                assert row["captions"][c["source_index"]]["language"] == "en"
    for old, new in zip(before, after, strict=True):
        assert {k: v for k, v in new.items() if k != "captions"} == {
            k: v for k, v in old.items() if k != "captions"
        }
    metrics = manifest_out["metrics"]
    assert not [k for k in metrics if k.startswith(("babelcap.caption/", "babelcap.clip/"))]
    assert manifest_out["this_run"]["units"] == 3 and manifest_out["complete"]
    # Published by name (no folder of this machine); the unit records keep the full paths.
    old_name, new_name = portable_ref(str(old_tr)), portable_ref(str(new_tr))
    assert old_name != new_name and str(tmp_path) not in old_name + new_name
    assert manifest_out["translators"] == {"es": [old_name], "pt": [new_name]}
    report = format_report(inspect_paths(str(out)))
    assert f"| es | {old_name} |" in report and f"| pt | {new_name} |" in report
    records = [json.loads(p.read_text()) for p in sorted((out / "_units").glob("unit-*.json"))]
    assert len(records) == 3
    assert all(r["languages_retranslated"] == ["pt"] for r in records)

    # New images would get es from the new translator next to the old one's: refused.
    make_inputs(tmp_path / "in", 4, start=10)
    with pytest.raises(ConfigMismatchError, match=r"differ for es\b.*--retranslate es"):
        run(cfg(new_tr, retranslate="pt"), workers=1, echo=False)
    final_out = run(cfg(new_tr, retranslate="pt,es"), workers=1, echo=False)
    final = _rows(out)
    assert len(final) == 14 and final_out["translators"] == {
        "es": [new_name],
        "pt": [new_name],
    }
    kept = [r for r in final if r["image_id"] in {b["image_id"] for b in before}]
    assert captions(kept, "pt") == captions(after, "pt")  # already the new translator's
    assert captions(kept, "es") != captions(after, "es")
    # Again: nothing to do.
    again = run(cfg(new_tr, retranslate="pt,es"), workers=1, echo=False)
    assert again["this_run"]["units"] == 0 and _rows(out) == final


def test_retry_failed_turns_transient_failures_into_rows(tmp_path):
    """A real transient read failure (EIO: the image path is a link to /proc/self/mem) is a
    `read_error` dead letter; once the file is readable, --retry-failed makes it a row and
    leaves the permanent failures and every other row as they were."""
    import os

    manifest = make_inputs(tmp_path / "in", 5, missing=1)
    flaky = tmp_path / "in" / "images" / "flaky.png"
    os.symlink("/proc/self/mem", flaky)
    with open(manifest, "a") as f:
        f.write(json.dumps({"image_path": str(flaky), "caption": "a flaky little square"}) + "\n")
    out = tmp_path / "out"
    cfg = AugmentConfig(input=str(manifest), output=str(out), unit_size=4)
    first = run(cfg, workers=1, echo=False)
    kinds = first["dead_letters"]
    assert kinds == {"read/missing_file": 1, "read/read_error": 1}, kinds
    before = _rows(out)

    flaky.unlink()  # the storage recovers
    from PIL import Image

    Image.new("RGB", (24, 24), (9, 99, 199)).save(flaky)
    retried = run(cfg.updated({"retry_failed": True}), workers=1, echo=False)
    assert retried["dead_letters"] == {"read/missing_file": 1}
    assert retried["accounting"] == {
        "inputs": 7,
        "rows_written": 6,
        "dead_lettered": 1,
        "duplicates_dropped": 0,
        "balanced": True,
    }
    after = _rows(out)
    assert [r for r in after if r["image_id"] in {b["image_id"] for b in before}] == before
    (new,) = [r for r in after if r["source_uri"] == "images/flaky.png"]  # from the input's folder
    assert new["captions"][0]["text"] == "a flaky little square"
    assert retried["this_run"]["units"] == 1  # only the unit that held the failure
    assert len(list(out.glob("data/*/*.parquet"))) == len(find_shards(out).files)
