"""Fill the `embedding` column of shards with a model's image embeddings.

The Beam pipeline does this at scale (`pipelines.clipscore` with `embed_images`); this is the
small local version for existing shards, tests and benchmarks. Embeddings are the normalised
output of `encode_image`, tagged with `babelcap.models.clip.image_tower_id(model)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from babelcap.core import schema
from babelcap.core.images import decode_rgb
from babelcap.core.shards import write_shard
from babelcap.models.clip import ClipBundle, image_tower_id


@torch.no_grad()
def embed_images(bundle: ClipBundle, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """Normalised image embeddings for PIL images (eval preprocessing)."""
    model = bundle.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([bundle.preprocess_val(im) for im in images[i : i + batch_size]])
        out.append(model.encode_image(x.to(device), normalize=True).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def embed_shards(
    bundle: ClipBundle, files: Sequence[str | Path], out_dir: str | Path, batch_size: int = 64
) -> list[Path]:
    """Copy shards to `out_dir` with `embedding` / `embedding_model` filled in."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower = image_tower_id(bundle.model)
    written = []
    for path in files:
        info = schema.validate(str(path))
        pf = pq.ParquetFile(path)
        table = pf.read()
        images = []
        for cell in table.column("image").to_pylist():
            if not cell or not cell.get("bytes"):
                raise schema.SchemaError(f"{path}: column 'image' needs bytes to embed")
            images.append(decode_rgb(cell["bytes"]))
        emb = embed_images(bundle, images, batch_size)
        table = table.set_column(
            table.schema.get_field_index("embedding"),
            "embedding",
            pa.array(emb.tolist(), type=pa.list_(pa.float32())),
        )
        table = table.set_column(
            table.schema.get_field_index("embedding_model"),
            "embedding_model",
            pa.array([tower] * len(table), pa.string()),
        )
        target = out / Path(path).name
        write_shard(
            target,
            table,
            config=info.config,
            models={**info.models, "embedder": tower},
            row_group_size=pf.metadata.row_group(0).num_rows,
        )
        written.append(target)
    return written
