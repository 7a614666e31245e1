"""Streaming babelcap shards into training batches.

Shards are read with `pyarrow.dataset`, one row group at a time (memory stays flat however big
the data). Each epoch the row groups are shuffled with the run's seed and split across ranks and
DataLoader workers; rows pass a shuffle buffer; one caption per image per pass is drawn
(CAPIVARA) or all are used. Batches are built inside the workers (tokenised text plus decoded
images, or the precomputed image embeddings), so the main process only trains.

The stream is a pure function of (seed, epoch, batch index): `skip_batches` lets a resumed run
continue with exactly the batches the interrupted run would have seen.

Several processes (torchrun): the row groups are dealt to `streams` streams (default: one per
rank) and every global batch takes `batch_size / streams` samples from each stream; rank r reads
only its own streams' row groups. The global batches depend on `streams`, not on how many ranks
read them, so a run on N processes sees the same batches as one process with the same `streams`
(and, with more than one stream, every stream stops at the same batch: the ranks stay in step).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from babelcap.core import schema
from babelcap.core.images import decode_rgb, open_rgb
from babelcap.core.shards import ShardSet, find_shards

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- caption choice


@dataclass(frozen=True)
class CaptionSelection:
    """Which captions of a row count as training text."""

    languages: tuple[str, ...] | None = None
    origins: tuple[str, ...] | None = None  # None: every origin except "gold"
    min_score: float | None = None
    top_k: int | None = None

    def select(self, captions: Sequence[dict[str, Any]]) -> list[int]:
        """Indices of the captions to use, in row order."""
        origins = self.origins or tuple(o for o in schema.ORIGINS if o != schema.ORIGIN_GOLD)
        keep = [
            i
            for i, c in enumerate(captions)
            if (self.languages is None or c["language"] in self.languages)
            and c["origin"] in origins
            and (self.min_score is None or c.get("score") is None or c["score"] >= self.min_score)
        ]
        if self.top_k is None:
            return keep
        by_lang: dict[str, list[int]] = {}
        for i in keep:
            by_lang.setdefault(captions[i]["language"], []).append(i)
        chosen: set[int] = set()
        for idx in by_lang.values():
            ranked = sorted(idx, key=lambda i: -(captions[i].get("score") or 0.0))
            chosen.update(ranked[: self.top_k])
        return [i for i in keep if i in chosen]


def shard_captions(
    specs: str | Sequence[str],
    language: str,
    origins: Sequence[str] | None,
    limit: int | None = None,
    splits: Sequence[str] | None = ("train",),
) -> list[str]:
    """Caption texts of one language (and `origins`, None: all but gold) in the rows of
    `splits` (as the trainer reads them), in file order, at most `limit` (e.g. to train a
    language's vocabulary on)."""
    shards = find_shards(specs)
    selection = CaptionSelection(languages=(language,), origins=tuple(origins) if origins else None)
    texts: list[str] = []
    dataset = ds.dataset(list(shards.files), format="parquet", filesystem=shards.filesystem)
    for batch in dataset.to_batches(columns=["captions"], filter=split_filter(splits)):
        for captions in batch.column("captions").to_pylist():
            captions = captions or []
            texts.extend(captions[i]["text"] for i in selection.select(captions))
            if limit is not None and len(texts) >= limit:
                return texts[:limit]
    return texts


# ----------------------------------------------------------------------------- the stream


@dataclass
class StreamConfig:
    batch_size: int = 64
    shuffle_buffer: int = 2048
    seed: int = 0
    caption_mode: str = "one"  # "one" | "all"
    use_embeddings: bool = False
    expected_embedding_model: str | None = None
    image_root: str | None = None
    with_source: bool = False
    drop_last: bool = True
    splits: tuple[str, ...] | None = ("train",)  # None: every row
    streams: int | None = None  # None: one per rank (see the module docstring)


def split_filter(splits: Sequence[str] | None) -> Any:
    """The rows a split filter keeps: those of `splits`, and those without a split."""
    if splits is None:
        return None
    return ds.field("split").isin(list(splits)) | ds.field("split").is_null()


def split_counts(shards: ShardSet) -> dict[str, int]:
    """Rows per `split` value over the shards ("(none)" for rows without one)."""
    counts: dict[str, int] = {}
    dataset = ds.dataset(list(shards.files), format="parquet", filesystem=shards.filesystem)
    for batch in dataset.to_batches(columns=["split"]):
        for value in batch.column("split").to_pylist():
            key = "(none)" if value is None else value
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


class ShardStream(IterableDataset):
    """An iterable of ready batches: {"text", "images" | "image_features", "languages", ...}."""

    def __init__(
        self,
        shards: ShardSet,
        selection: CaptionSelection,
        config: StreamConfig,
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
        preprocess: Callable[[Any], torch.Tensor] | None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if config.caption_mode not in ("one", "all"):
            raise ValueError(f"caption_mode must be 'one' or 'all', got {config.caption_mode!r}")
        self.shards = shards
        self.selection = selection
        self.cfg = config
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed (resume)
        self.streams = config.streams or world_size
        if self.streams % world_size:
            raise ValueError(
                f"data.streams={self.streams} must be a multiple of the number of "
                f"processes ({world_size}): each rank reads the same number of streams"
            )
        if config.batch_size % self.streams:
            raise ValueError(
                f"data.batch_size={config.batch_size} must be a multiple of data.streams="
                f"{self.streams} (each global batch takes the same share of every stream; "
                "with several processes the default is one stream per process)"
            )
        if self.streams > 1 and not config.drop_last:
            raise ValueError(
                "data.drop_last=false needs one stream (one process): with several, every "
                "stream must yield the same number of full batches"
            )
        self._unit_samples: dict[tuple[str, int], int] | None = None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches
        if self.streams > 1 and self._unit_samples is None:
            # Counted once, in the main process (DataLoader workers get a copy): every rank
            # needs every stream's length to stop at the same batch.
            self._unit_samples = self._count_samples()

    def _count_samples(self) -> dict[tuple[str, int], int]:
        """Samples each row group gives (rows with a chosen caption; captions in "all" mode)."""
        fmt = ds.ParquetFileFormat()
        counts: dict[tuple[str, int], int] = {}
        for path, rg in sorted(self._units()):
            frag = fmt.make_fragment(path, filesystem=self.shards.fs, row_groups=[rg])
            table = frag.to_table(columns=["captions"], filter=split_filter(self.cfg.splits))
            n = 0
            for captions in table.column("captions").to_pylist():
                chosen = len(self.selection.select(captions or []))
                n += min(chosen, 1) if self.cfg.caption_mode == "one" else chosen
            counts[(path, rg)] = n
        return counts

    def _epoch_batches(self, units: list[tuple[str, int]], n_workers: int) -> int | None:
        """Global batches this epoch when there are several streams (None: until the data ends).

        Global batch j is batch j // W of worker j % W (DataLoader round robin), made of one chunk
        of each stream's (stream, worker) slot: the epoch ends at the first j some slot cannot
        fill, on every rank alike."""
        if self.streams == 1:
            return None
        if self._unit_samples is None:
            self._unit_samples = self._count_samples()
        chunk = self.cfg.batch_size // self.streams
        total = self.streams * n_workers
        limit = None
        for w in range(n_workers):
            full = min(
                sum(self._unit_samples[u] for u in units[s * n_workers + w :: total]) // chunk
                for s in range(self.streams)
            )
            end = full * n_workers + w
            limit = end if limit is None else min(limit, end)
        return limit

    # -- units of work: (file, row group), shuffled per epoch
    def _units(self) -> list[tuple[str, int]]:
        units: list[tuple[str, int]] = []
        fmt = ds.ParquetFileFormat()
        for path in self.shards.files:
            frag = fmt.make_fragment(path, filesystem=self.shards.fs)
            units.extend((path, rg.id) for rg in frag.row_groups)
        random.Random(f"{self.cfg.seed}:{self.epoch}:units").shuffle(units)
        return units

    def _columns(self) -> list[str]:
        cols = ["image_id", "captions"]
        if self.cfg.use_embeddings:
            cols += ["embedding", "embedding_model"]
        else:
            cols += ["image", "source_uri"]
        return cols

    def _rows(self, units: list[tuple[str, int]]) -> Iterator[tuple[str, dict[str, Any]]]:
        fmt = ds.ParquetFileFormat()
        cols = self._columns()
        for path, rg in units:
            frag = fmt.make_fragment(path, filesystem=self.shards.fs, row_groups=[rg])
            try:
                table = frag.to_table(columns=cols, filter=split_filter(self.cfg.splits))
            except (pa.ArrowInvalid, KeyError) as exc:
                raise schema.SchemaError(f"{path}: cannot read columns {cols}: {exc}") from exc
            yield from ((path, row) for row in table.to_pylist())

    def _samples(self, units, rng: random.Random) -> Iterator[dict[str, Any]]:
        for path, row in self._rows(units):
            captions = row["captions"] or []
            chosen = self.selection.select(captions)
            if not chosen:
                continue
            if self.cfg.caption_mode == "one":
                chosen = [rng.choice(chosen)]
            for i in chosen:
                yield {
                    "path": path,
                    "row": row,
                    "caption": captions[i],
                    "source": self._source_text(captions, i),
                }

    @staticmethod
    def _source_text(captions: Sequence[dict[str, Any]], i: int) -> str | None:
        src = captions[i].get("source_index")
        # Follow the chain back to the caption that was not translated.
        seen = set()
        while src is not None and 0 <= src < len(captions) and src not in seen:
            seen.add(src)
            i = src
            src = captions[i].get("source_index")
        return captions[i]["text"] if seen else None

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random):
        size = max(1, self.cfg.shuffle_buffer)
        buf: list[dict[str, Any]] = []
        for s in samples:
            if len(buf) < size:
                buf.append(s)
                continue
            j = rng.randrange(size)
            yield buf[j]
            buf[j] = s
        rng.shuffle(buf)
        yield from buf

    def _chunks(self, units: list[tuple[str, int]], slot: int, size: int) -> Iterator[list]:
        """One slot's samples (its row groups, shuffled with its own seed) in lists of `size`."""
        rng = random.Random(f"{self.cfg.seed}:{self.epoch}:{slot}:rows")
        chunk: list[dict[str, Any]] = []
        for sample in self._shuffled(self._samples(units, rng), rng):
            chunk.append(sample)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk  # a partial last chunk: kept only with one stream and drop_last=false

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n_workers = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        # After resuming at batch B the DataLoader asks worker 0 first; worker w therefore plays
        # the part of original worker (w + B) % W so the batch order is exactly the original one.
        played = (worker + self.skip_batches) % n_workers
        skip = max(0, (self.skip_batches - played + n_workers - 1) // n_workers)
        all_units = self._units()
        limit = self._epoch_batches(all_units, n_workers)
        total = n_workers * self.streams
        per_rank = self.streams // self.world_size
        size = self.cfg.batch_size // self.streams
        # This rank's streams, each read by this worker's slot of it: disjoint row groups.
        slots = [
            s * n_workers + played for s in range(self.rank * per_rank, (self.rank + 1) * per_rank)
        ]
        chunks = [self._chunks(all_units[slot::total], slot, size) for slot in slots]
        for produced, parts in enumerate(zip(*chunks, strict=False)):
            if limit is not None and produced * n_workers + played >= limit:
                break
            batch = [sample for part in parts for sample in part]
            if len(batch) < size * per_rank and self.cfg.drop_last:
                break
            if produced >= skip:
                yield self.collate(batch)

    # -- batch assembly
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [s["caption"]["text"] for s in samples]
        out: dict[str, Any] = {
            "captions": texts,
            "languages": [s["caption"]["language"] for s in samples],
            "image_ids": [s["row"]["image_id"] for s in samples],
        }
        if self.tokenizer is not None:
            out["text"] = self.tokenizer(texts)
        if self.cfg.with_source:
            sources = [s["source"] or s["caption"]["text"] for s in samples]
            out["source_captions"] = sources
            if self.tokenizer is not None:
                out["source_text"] = self.tokenizer(sources)
        if self.cfg.use_embeddings:
            out["image_features"] = torch.stack([self._embedding(s) for s in samples])
        else:
            out["images"] = torch.stack([self._image(s) for s in samples])
        return out

    def _embedding(self, sample: dict[str, Any]) -> torch.Tensor:
        row = sample["row"]
        if row["embedding"] is None:
            raise schema.SchemaError(
                f"{sample['path']}: column 'embedding' is null for image "
                f"{row['image_id']} (embedding mode needs it on every row)"
            )
        want = self.cfg.expected_embedding_model
        if want is not None and row["embedding_model"] != want:
            raise schema.SchemaError(
                f"{sample['path']}: column 'embedding_model' is {row['embedding_model']!r} but the "
                f"model's image tower is {want!r}; recompute the embeddings or use images"
            )
        return torch.tensor(row["embedding"], dtype=torch.float32)

    def _image(self, sample: dict[str, Any]) -> torch.Tensor:
        row = sample["row"]
        image = row.get("image") or {}
        if image.get("bytes"):
            pil = decode_rgb(image["bytes"])
        else:
            ref = image.get("path") or row.get("source_uri")
            if not ref:
                raise schema.SchemaError(
                    f"{sample['path']}: column 'image' has neither bytes nor "
                    f"path for image {row['image_id']}"
                )
            pil = open_rgb(self._resolve(ref, sample["path"]))
        if self.preprocess is None:
            raise ValueError("image batches need the model's preprocess transform")
        return self.preprocess(pil)

    def _resolve(self, ref: str, shard_path: str) -> str:
        if os.path.isabs(ref) or "://" in ref:
            return ref
        base = self.cfg.image_root or str(Path(shard_path).parent)
        return os.path.join(base, ref)


def detect_embeddings(shards: ShardSet, expected_model: str | None) -> tuple[bool, str]:
    """Whether every shard carries embeddings of `expected_model` (first row group checked)."""
    for path in shards.files:
        with shards.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_row_groups == 0:
                continue
            table = pf.read_row_group(0, columns=["embedding", "embedding_model"])
        if table.num_rows == 0:
            continue
        if table.column("embedding").null_count == table.num_rows:
            return False, f"{path}: no embeddings"
        models = set(table.column("embedding_model").to_pylist())
        if expected_model is not None and models != {expected_model}:
            return (
                False,
                f"{path}: embeddings made by {sorted(map(str, models))}, "
                f"model's image tower is {expected_model}",
            )
    return True, "every shard has embeddings of this image tower"


def make_loader(dataset: ShardStream, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader over ready batches; its own generator keeps the global RNG untouched."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        generator=gen,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
