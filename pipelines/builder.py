"""Wire the stages into one Beam pipeline. No logic of its own: each stage is a module.

    read (sources) -> decode + checks (decode) -> drop duplicate images (dedup)
    -> drop / flag an evaluation set's images (decontaminate, optional)
    -> caption (captioning, RunInference) -> English filters (filters)
    -> CLIP scores / embeddings (clipscore, RunInference) -> CAPIVARA selection (filters)
    -> translate (translation, RunInference) -> translation filters (filters)
    -> per work unit: data files + dead letters + stats (sinks)

Only the inputs of the wave's units (`unit_of`) go past the reader; images already committed
(`present`) are dropped as `already_present` right after the duplicate filter.

Every stage's rejects are flattened into the one dead-letter output.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam

from babelcap.pipelines.deadletter import DEAD, reject
from babelcap.pipelines.decode import DecodeImages
from babelcap.pipelines.decontaminate import DropEvalImages
from babelcap.pipelines.dedup import DropDuplicateImages
from babelcap.pipelines.filters import FilterEnglish, FilterTranslations, SelectCaptions
from babelcap.pipelines.options import AugmentConfig
from babelcap.pipelines.sinks import WriteOutputs
from babelcap.pipelines.sources import ReadInputs, detect_format, tar_mode
from babelcap.pipelines.units import DropPresent, KeepUnits


class RequireCaptions(beam.DoFn):
    """A row with no caption left is of no use for training: dead-letter it, with the reason."""

    def process(self, rec: dict[str, Any]) -> Iterator[Any]:
        if rec.get("captions"):
            yield rec
        else:
            yield reject(rec, "filter", "no_captions", "every caption was filtered out")


def input_roots(config: AugmentConfig) -> tuple[str, ...]:
    """The local folder the input's files are named from in the output (as given and
    absolute): a folder input itself, a manifest's folder, the folder of the tar shards;
    none for a remote input."""
    given = config.input
    if "://" in given and not given.startswith("file://"):
        return ()
    fmt = config.input_format if config.input_format != "auto" else detect_format(given)
    if fmt == "manifest":
        root = posixpath.dirname(given)
    elif fmt == "folder":
        root = given
    else:  # tar shards: a tar, a folder of them, or a pattern (`in/shard-{000..009}.tar`)
        head = re.split(r"[*?\[{]", given, maxsplit=1)[0]
        root = head if head == given and not tar_mode(given) else posixpath.dirname(head)
    root = root.rstrip("/")
    if not root or root == "file:":
        return ()
    if root.startswith("file://"):
        return (root,)
    return tuple(dict.fromkeys((root, os.path.abspath(root), os.path.realpath(root))))


def relative_to(uri: str | None, roots: tuple[str, ...]) -> str | None:
    """`uri` relative to the first of `roots` it lies in; as given otherwise (a URI, a path
    outside the input's folder: the user's choice)."""
    for root in roots:
        if uri and uri.startswith(root + "/"):
            return uri[len(root) + 1 :]
    return uri


class StoreImage(beam.DoFn):
    """Put the original bytes into `image` (store_image="bytes") and drop the working copy.

    When the image itself is stored (bytes, reencode), `source_uri` and `image.path` only say
    where it came from: an image inside the input's folder is named relative to that folder, so
    the output carries no folder of this machine. When only the reference is stored (path,
    none), it is kept as given: it is how readers (`datasets`, the trainer) find the pixels."""

    def __init__(self, store_image: str, roots: tuple[str, ...] = ()):
        self.store_image = store_image
        self.roots = roots if store_image in ("bytes", "reencode") else ()

    def process(self, rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        out = {k: v for k, v in rec.items() if k != "data"}
        if self.roots:
            out["uri"] = relative_to(rec.get("uri"), self.roots)
        if self.store_image == "bytes":
            out["image"] = {"bytes": rec["data"], "path": out.get("uri")}
        elif self.roots and out.get("image"):
            out["image"] = {**out["image"], "path": relative_to(out["image"]["path"], self.roots)}
        yield out


def build(
    pipeline: beam.Pipeline,
    config: AugmentConfig,
    staging: str,
    models: Mapping[str, Any],
    languages: tuple[str, ...],
    unit_of: Mapping[str, int],
    present: frozenset[str] = frozenset(),
) -> None:
    """Add the augmentation of the work units in `unit_of` (input_ref -> unit) to `pipeline`,
    writing into the `staging` folder; images in `present` (committed already) are skipped."""
    # Only this wave's inputs are read (the others are listed, not opened).
    records, read_dead = pipeline | "Read" >> ReadInputs(config, keep=lambda: KeepUnits(unit_of))
    decoded = records | "Decode" >> beam.ParDo(DecodeImages(config)).with_outputs(DEAD, main="ok")
    records, duplicates = decoded.ok | "DedupImages" >> DropDuplicateImages()
    dead = [read_dead, decoded[DEAD], duplicates]
    if present:
        fresh = records | "DropPresent" >> beam.ParDo(DropPresent(present)).with_outputs(
            DEAD, main="ok"
        )
        records = fresh.ok
        dead.append(fresh[DEAD])
    if config.decontaminate is not None:
        checked = records | "Decontaminate" >> beam.ParDo(
            DropEvalImages(
                config.decontaminate.fingerprints,
                config.decontaminate.mode,
                config.max_image_pixels,
            )
        ).with_outputs(DEAD, main="ok")
        records = checked.ok
        dead.append(checked[DEAD])

    # The model stages are imported only when the job has them: they use Beam's RunInference,
    # whose module imports torch and scipy (~3 s in each process and Beam worker), which a job on
    # alt-text without CLIP or translation never needs.
    if config.captioner is not None:
        from babelcap.pipelines.captioning import Caption

        records, failed = records | "Caption" >> Caption(
            config.captioner, config.seed, config.max_image_pixels, config.model_copies
        )
        dead.append(failed)
    records = records | "FilterEnglish" >> beam.ParDo(FilterEnglish(config.text))
    clip = config.clip
    if clip is not None and (clip.score or clip.embed_images):
        from babelcap.pipelines.clipscore import ClipScore

        records, failed = records | "Clip" >> ClipScore(
            clip, config.max_image_pixels, config.model_copies
        )
        dead.append(failed)
    records = records | "SelectCaptions" >> beam.ParDo(SelectCaptions(config.text, clip))
    # No stage after this one looks at pixels: stop shipping the original bytes between stages
    # (what the shard stores is already in `image`).
    records = records | "StoreImage" >> beam.ParDo(
        StoreImage(config.store_image, input_roots(config))
    )
    if languages:
        from babelcap.pipelines.translation import Translate

        records, failed = records | "Translate" >> Translate(
            config.translator, languages, config.model_copies
        )
        dead.append(failed)
        records = records | "FilterTranslations" >> beam.ParDo(
            FilterTranslations(config.text, languages)
        )
    checked = records | "RequireCaptions" >> beam.ParDo(RequireCaptions()).with_outputs(
        DEAD, main="ok"
    )
    dead.append(checked[DEAD])
    all_dead = tuple(dead) | "AllDeadLetters" >> beam.Flatten()
    _ = (checked.ok, all_dead) | "Write" >> WriteOutputs(
        staging, config.to_dict(), models, config.num_shards, config.rows_per_shard, unit_of
    )
