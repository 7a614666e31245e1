"""The token-embedding matrix of a continual stage: growing it for a new vocabulary (TEIR or
plain initialisation), training it alone, and scaling each row's gradient and update (TEIR)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from babelcap.models.clip import unwrap
from babelcap.training.lit import text_transformer


def word_embeddings(model: torch.nn.Module) -> torch.nn.Embedding:
    """The token-embedding matrix of the open_clip model's HF text tower."""
    return text_transformer(unwrap(model)).get_input_embeddings()


def only_token_embeddings(model: torch.nn.Module) -> torch.nn.Parameter:
    """Freeze everything except the text tower's token-embedding matrix; return it."""
    raw = unwrap(model)
    for p in raw.parameters():
        p.requires_grad = False
    weight = word_embeddings(raw).weight
    weight.requires_grad = True
    return weight


def grow_embeddings(
    model: torch.nn.Module,
    new_size: int,
    init: str = "teir",
    exclude_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> int:
    """Grow the token-embedding matrix to `new_size` rows (old rows kept); returns the old size.

    init "teir": new rows ~ N(mean, std) of the existing rows, per dimension (special rows in
    `exclude_ids` left out of the statistics), so old and new embeddings share a distribution.
    init "plain": N(0, initializer_range) as the architecture initialises embeddings.
    """
    hf = text_transformer(unwrap(model))
    old = hf.get_input_embeddings().weight
    old_size, dim = old.shape
    if new_size < old_size:
        raise ValueError(f"cannot shrink the vocabulary from {old_size} to {new_size}")
    if new_size == old_size:
        return old_size
    with torch.no_grad():
        keep = torch.ones(old_size, dtype=torch.bool)
        keep[[i for i in exclude_ids if 0 <= i < old_size]] = False
        rows = old.detach().float()[keep]
        hf.resize_token_embeddings(new_size, mean_resizing=False)
        weight = hf.get_input_embeddings().weight
        n_new = new_size - old_size
        noise = torch.randn(n_new, dim, generator=generator)
        if init == "teir":
            new = rows.mean(0) + noise * rows.std(0)
        elif init == "plain":
            new = noise * float(getattr(hf.config, "initializer_range", 0.02))
        else:
            raise ValueError(f"init must be 'teir' or 'plain', got {init!r}")
        weight[old_size:] = new.to(weight.dtype).to(weight.device)
    text = unwrap(model).text
    if getattr(text, "config", None) is not None:
        text.config.vocab_size = new_size
    return old_size


def teir_row_scale(
    vocab_size: int,
    current: set[int],
    earlier: Sequence[set[int]],
    special_ids: Iterable[int] = (),
    teir: bool = True,
) -> torch.Tensor:
    """Per-row scale of gradient and update.

    TEIR: 1[row used by the current language] / (1 + number of earlier languages using it).
    Plain: 1 everywhere. Special tokens: 0 in both.
    """
    if teir:
        counts = torch.zeros(vocab_size)
        for used in earlier:
            idx = [i for i in used if i < vocab_size]
            counts[idx] += 1
        present = torch.zeros(vocab_size)
        present[[i for i in current if i < vocab_size]] = 1.0
        scale = present / (1.0 + counts)
    else:
        scale = torch.ones(vocab_size)
    scale[[i for i in special_ids if 0 <= i < vocab_size]] = 0.0
    return scale


class RowScaledUpdate:
    """Scale one parameter's gradient rows and its optimizer update rows (decay included).

    The gradient hook scales the rows' gradients (rows with scale 0 get none, so Adam's moments
    for them stay zero and clipping ignores them). Because Adam normalises gradient scale away,
    the step itself is scaled too: the optimizer's pre/post step hooks keep the row's old value
    w0 and set w = w0 + scale * (w_adamw - w0), which scales AdamW's decoupled weight decay by the
    same factor. Rows with scale 0 come out bit-identical.
    """

    def __init__(self, param: torch.nn.Parameter, scale: torch.Tensor) -> None:
        self.param = param
        self.scale = scale.to(param.device, param.dtype)
        self._before: torch.Tensor | None = None
        self._handles: list[Any] = []

    def _grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.scale.to(grad.dtype).unsqueeze(1)

    def _pre(self, optimizer, args, kwargs) -> None:
        self._before = self.param.detach().clone()

    def _post(self, optimizer, args, kwargs) -> None:
        if self._before is None:
            return
        with torch.no_grad():
            s = self.scale.unsqueeze(1)
            self.param.copy_(
                torch.where(s == 0, self._before, self._before + s * (self.param - self._before))
            )
        self._before = None

    def attach(self, optimizer: torch.optim.Optimizer) -> RowScaledUpdate:
        self._handles = [
            self.param.register_hook(self._grad_hook),
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
