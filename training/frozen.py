"""Frozen weights that cost no memory of their own: mapped from the checkpoint, or read from it.

A LoRA / LiT run trains a fraction of a percent of the model; the rest is read, never written.
`map_frozen_weights` points the CPU weights at the memory-mapped safetensors checkpoint they
were loaded from, so they cost only the pages a step reads. A large vocabulary's embedding
table would still fill up: a lookup faults in the rows' neighbours with them (fault-around,
read-ahead), and a long run reads most of the vocabulary, so XLM-R's 768 MB table ends up
resident. `read_embeddings_from_file` swaps each frozen, mapped embedding table for a
`FileRowsEmbedding`, which reads the rows a batch needs and nothing else.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

# A safetensors header names every tensor with its dtype, shape and offsets; XLM-R's is 20 KB.
MAX_HEADER_BYTES = 100 * 2**20
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
MAPPED_FROM = "_babelcap_mapped_from"  # on a mapped parameter: (checkpoint, key in it)


def map_frozen_weights(model: torch.nn.Module, checkpoint: str | Path | None) -> int:
    """Point the model's CPU weights at the memory-mapped safetensors checkpoint they were loaded
    from (copy-on-write: weights that train get their own pages when first updated; the file is
    never written). Frozen weights then cost only the pages a step reads, and processes on one
    machine share them. Call before wrapping the model (names as in the checkpoint); returns the
    bytes mapped. Each mapped parameter remembers its checkpoint and key (`MAPPED_FROM`)."""
    if checkpoint is None or Path(str(checkpoint)).suffix != ".safetensors":
        return 0
    if not Path(str(checkpoint)).is_file():
        return 0
    weights = load_file(str(checkpoint))  # lazily mapped, nothing read yet
    mapped = 0
    for name, param in model.named_parameters():
        key = name if name in weights else f"module.{name}"
        src = weights.get(key)
        if (
            src is not None
            and param.device.type == "cpu"
            and src.shape == param.shape
            and src.dtype == param.dtype
        ):
            param.data = src
            setattr(param, MAPPED_FROM, (str(checkpoint), key))
            mapped += src.numel() * src.element_size()
    return mapped


def tensor_offsets(path: str | Path) -> dict[str, tuple[int, str, list[int]]]:
    """{key: (byte offset in the file, dtype, shape)} from a safetensors file's header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header size)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {size} bytes (over the 100 MB bound)")
        header = json.loads(f.read(size))
    return {
        key: (8 + size + info["data_offsets"][0], info["dtype"], list(info["shape"]))
        for key, info in header.items()
        if key != "__metadata__"
    }


class FileRowsEmbedding(torch.nn.Module):
    """A frozen embedding table looked up in its safetensors file: each forward reads the rows
    the ids need (each run of consecutive ids in one `preadv`), so the table is never resident.
    Same output as `torch.nn.Embedding` over the table; it has no parameters (nothing trains)."""

    def __init__(
        self, path: str | Path, offset: int, num_embeddings: int, embedding_dim: int, dtype
    ) -> None:
        super().__init__()
        self.path, self.offset = str(path), int(offset)
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.row_bytes = embedding_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_mapped(cls, weight: torch.Tensor) -> FileRowsEmbedding | None:
        """For a parameter `map_frozen_weights` mapped (None otherwise, or if the file no longer
        holds it as mapped)."""
        source = getattr(weight, MAPPED_FROM, None)
        if source is None or weight.ndim != 2:
            return None
        path, key = source
        entry = tensor_offsets(path).get(key)
        if entry is None or _DTYPES.get(entry[1]) != weight.dtype or entry[2] != [*weight.shape]:
            return None
        return cls(path, entry[0], weight.shape[0], weight.shape[1], weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"ids outside the table's {self.num_embeddings} rows")
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        rows = torch.empty(len(unique), self.embedding_dim, dtype=self.dtype)
        ids_list = unique.tolist()
        if not ids_list:
            return rows[inverse].reshape(*ids.shape, self.embedding_dim).to(ids.device)
        buf = memoryview(rows.view(torch.uint8).numpy()).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            start = 0
            while start < len(ids_list):
                end = start + 1  # the run of consecutive ids from `start`
                while end < len(ids_list) and ids_list[end] == ids_list[end - 1] + 1:
                    end += 1
                want = (end - start) * self.row_bytes
                got = os.preadv(
                    fd,
                    [buf[start * self.row_bytes : end * self.row_bytes]],
                    self.offset + ids_list[start] * self.row_bytes,
                )
                if got != want:
                    raise OSError(f"{self.path}: {got} of {want} bytes read (file truncated?)")
                start = end
        finally:
            os.close(fd)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim).to(ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, from {self.path}"


def vocabulary_tables(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The token embedding tables of a model's text towers: an HF model's input embeddings,
    open_clip's own `token_embedding`. (Position and type tables are read whole every step.)"""
    tables = []
    for module in model.modules():
        found = [_input_embeddings(module), getattr(module, "token_embedding", None)]
        tables += [t for t in found if isinstance(t, torch.nn.Module) and t not in tables]
    return tables


def _input_embeddings(module: torch.nn.Module) -> object:
    get = getattr(module, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # an HF base class that has none
        return None


def read_embeddings_from_file(
    model: torch.nn.Module,
) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap every frozen vocabulary table (`vocabulary_tables`) that `map_frozen_weights` mapped
    for a `FileRowsEmbedding`. Call after the method froze what it freezes. A table wrapped by
    an adapter (peft LoRA on the embeddings) stays as it is: the wrapper reads its attributes.
    Returns (parent, attribute, the table) for each, to put back before the model is exported
    or saved whole (`put_back`)."""
    tables = {id(t) for t in vocabulary_tables(model)}
    swapped = []
    for name, module in list(model.named_modules()):
        if id(module) not in tables or type(module) is not torch.nn.Embedding:
            continue
        if module.weight.requires_grad or module.max_norm is not None:
            continue  # trains, or renormalises its rows in place: not read-only
        reader = FileRowsEmbedding.from_mapped(module.weight)
        if reader is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        for hooks in _HOOKS:  # e.g. peft's input-grad hook for reentrant checkpointing
            setattr(reader, hooks, getattr(module, hooks))
        setattr(parent, attr, reader)
        swapped.append((parent, attr, module))
    return swapped


def put_back(swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    """Undo `read_embeddings_from_file`."""
    for parent, attr, module in swapped:
        setattr(parent, attr, module)
    swapped.clear()
