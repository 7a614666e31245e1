"""Per-language parameter-efficient modules on the text tower (PECTVLM), through peft.

One peft adapter per language, all inside one `PeftModel` around the open_clip Hugging Face text
tower and named by language code (`pt`, `hi`, ...), so `set_language(model, "hi")` is peft's
`set_adapter("hi")`. peft saves them as one folder per language (`adapter/pt/`, `adapter/hi/`:
adapter_config.json + adapter_model.safetensors each); `load_language_adapters` attaches them
again. A single adapter shared by all languages is named `default` (the baseline).

Kinds: LoRA (`lora`) and (IA)3 (`ia3`) — the peft tuners that inject into any `nn.Module`, as
open_clip's `HFTextEncoder` is; prompt tuning would need a `PreTrainedModel` whose outputs the
tower's pooler does not expect.

Which adapter a language gets: its own when there is one, else the shared `default`, else none
(the base model: English, which the base CLIP already speaks).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from babelcap.models.clip import unwrap
from babelcap.training.config import LoraConfig

SHARED = "default"  # peft's default adapter name: one adapter for every language
CONFIG_FILE = "adapter_config.json"

# One adapter's configuration (the same for every language) is the one LoRA definition of the
# training config: `training.config.LoraConfig` (kind lora | ia3, r, alpha, dropout,
# target_modules, feedforward_modules, modules_to_save); unknown keys are an error.
AdapterSpec = LoraConfig


# ----------------------------------------------------------------------------- size


def _matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the module name equals one or ends with `.t`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def adapter_parameter_formula(text_tower: torch.nn.Module, spec: AdapterSpec) -> int:
    """Parameters of ONE adapter on a plain (not yet wrapped) text tower.

    LoRA: r * (d_in + d_out) per adapted Linear (r * (rows + dim) per adapted Embedding, e.g.
    `word_embeddings`). (IA)3: one scaling vector per adapted Linear,
    of size d_in for feed-forward modules (it scales their input) and d_out otherwise.
    Plus a copy of every module to save.
    """
    count = 0
    for name, module in text_tower.named_modules():
        if not _matches(name, spec.targets):
            continue
        if isinstance(module, torch.nn.Embedding) and spec.kind == "lora":
            count += spec.r * (module.num_embeddings + module.embedding_dim)
            continue
        if not isinstance(module, torch.nn.Linear):
            continue
        if spec.kind == "lora":
            count += spec.r * (module.in_features + module.out_features)
        elif _matches(name, spec.feedforward):
            count += module.in_features
        else:
            count += module.out_features
    for name in spec.modules_to_save:
        count += sum(p.numel() for p in text_tower.get_submodule(name).parameters())
    return count


def _adapter_of(param_name: str) -> str | None:
    """Adapter name in a peft parameter name (`...query.lora_A.pt.weight`, `...key.ia3_l.pt`,
    `...proj.modules_to_save.pt.weight`), or None for a base-model parameter."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(("lora_", "ia3_")) or part == "modules_to_save":
            return parts[i + 1]
    return None


def adapter_parameters(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters that belong to adapter `name`."""
    text = unwrap(model).text
    return {n: p for n, p in text.named_parameters() if _adapter_of(n) == name}


def base_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the full model without any adapter (peft's per-adapter copies excluded)."""
    return sum(p.numel() for n, p in unwrap(model).named_parameters() if _adapter_of(n) is None)


def adapter_size(model: torch.nn.Module, name: str) -> dict[str, float]:
    """Size of one adapter: parameters and percent of the full model (PECTVLM: ~0.16%)."""
    params = sum(p.numel() for p in adapter_parameters(model, name).values())
    total = base_parameter_count(model)
    return {
        "parameters": params,
        "model_parameters": total,
        "percent": 100.0 * params / max(1, total),
    }


# ----------------------------------------------------------------------------- attach / swap


def add_language_adapters(
    model: torch.nn.Module, languages: Sequence[str], spec: AdapterSpec
) -> torch.nn.Module:
    """Wrap the text tower in a PeftModel with one adapter per language code (all trainable).

    `languages=["default"]` (or `[SHARED]`) gives one shared adapter. The base text tower is
    frozen; nothing else is touched (lock the image tower separately).
    """
    from peft import get_peft_model

    raw = unwrap(model)
    if not (hasattr(raw, "text") and hasattr(raw.text, "transformer")):
        raise ValueError(
            "per-language adapters need an open_clip model with a Hugging Face "
            "text tower (text_cfg.hf_model_name)"
        )
    languages = list(dict.fromkeys(languages))
    if not languages:
        raise ValueError("add_language_adapters needs at least one language code")
    for p in raw.text.parameters():
        p.requires_grad = False
    config = spec.peft_config()
    text = get_peft_model(raw.text, config, adapter_name=languages[0])
    for lang in languages[1:]:
        text.add_adapter(lang, spec.peft_config())
    raw.text = text
    mark_adapters_trainable(raw, languages)
    return model


def mark_adapters_trainable(model: torch.nn.Module, languages: Iterable[str]) -> None:
    """requires_grad on every listed adapter (peft's set_adapter leaves only the active one)."""
    for lang in languages:
        for p in adapter_parameters(model, lang).values():
            p.requires_grad = True


def language_adapters(model: torch.nn.Module) -> list[str]:
    """Names of the adapters on the text tower (language codes and/or `default`)."""
    from peft import PeftModel

    text = getattr(unwrap(model), "text", None)
    return list(text.peft_config) if isinstance(text, PeftModel) else []


def adapter_for(model: torch.nn.Module, lang: str) -> str | None:
    """The adapter a language uses: its own, else the shared one, else None (base model)."""
    names = language_adapters(model)
    if lang in names:
        return lang
    return SHARED if SHARED in names else None


def set_language(model: torch.nn.Module, lang: str, keep_trainable: bool = True) -> str | None:
    """Activate the adapter for `lang` (see `adapter_for`); returns its name or None.

    With no adapter for the language the adapter layers are disabled (base model). peft's
    `set_adapter` makes only the active adapter trainable; `keep_trainable` restores
    requires_grad on adapters that were trainable, so one optimizer can train them all.
    """
    raw = unwrap(model)
    names = language_adapters(raw)
    if not names:
        return None
    name = adapter_for(raw, lang)
    tuner = raw.text.base_model
    trainable = [
        n for n in names if any(p.requires_grad for p in adapter_parameters(raw, n).values())
    ]
    if name is None:
        tuner.disable_adapter_layers()
    else:
        tuner.enable_adapter_layers()
        if raw.text.active_adapter != name:
            raw.text.set_adapter(name)
    if keep_trainable:
        mark_adapters_trainable(raw, trainable)
    return name


@contextmanager
def use_language(model: torch.nn.Module, lang: str):
    """Context manager: the model speaks `lang` (its adapter active) inside the block."""
    raw = unwrap(model)
    names = language_adapters(raw)
    previous = raw.text.active_adapter if names else None
    try:
        yield set_language(raw, lang)
    finally:
        if previous is not None:
            set_language(raw, previous)


# ----------------------------------------------------------------------------- save / load


def save_language_adapters(model: torch.nn.Module, out_dir: str | Path) -> dict[str, Path]:
    """Save every adapter: `out_dir/<lang>/` (peft's layout; `default` lands in `out_dir`)."""
    raw = unwrap(model)
    names = language_adapters(raw)
    if not names:
        raise ValueError("this model has no adapters on its text tower")
    out = Path(out_dir)
    raw.text.save_pretrained(str(out), safe_serialization=True)
    write_adapter_card(raw, out)
    return {n: (out if n == SHARED else out / n) for n in names}


# ----------------------------------------------------------------------------- model card

CARD_FILE = "README.md"


def logical_base_name(model: torch.nn.Module) -> str | None:
    """A name for the base model that does not depend on where it lies: the base CLIP's folder
    name for a local text tower (`.../clip-base/text` -> `clip-base`), a Hub id as it is."""
    raw = unwrap(model)
    text = raw.text.get_base_model() if language_adapters(raw) else raw.text
    config = getattr(text, "config", None)
    name = str(getattr(config, "_name_or_path", "") or "")
    if not name:
        return None
    if not (Path(name).is_absolute() or Path(name).exists()):
        return name  # a Hub id (or another logical name already)
    path = Path(name)
    return path.parent.name if path.name in ("text", "") else path.name


def _run_info(run_dir: Path | None) -> dict[str, Any]:
    """What the trainer left in its run folder: the configuration and the last metrics row."""
    info: dict[str, Any] = {}
    if run_dir is None:
        return info
    config, metrics = Path(run_dir) / "config.yaml", Path(run_dir) / "metrics.jsonl"
    if config.is_file() and config.stat().st_size < 1_000_000:
        import yaml

        with suppress(yaml.YAMLError):
            info["config"] = yaml.safe_load(config.read_text()) or {}
    if metrics.is_file():
        import json

        with metrics.open("rb") as f:
            f.seek(max(0, metrics.stat().st_size - 65_536))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        with suppress(ValueError):
            info["last_metrics"] = json.loads(lines[-1]) if lines else None
    return info


def _portable(path: Any) -> str:
    """A data path without this machine's folders: its last two components."""
    text = str(path)
    if "://" in text or not Path(text).is_absolute():
        return text
    return "/".join(Path(text).parts[-2:])


def write_adapter_card(
    model: torch.nn.Module,
    out_dir: str | Path,
    base_model: str | None = None,
    run_dir: str | Path | None = None,
) -> Path:
    """Write the adapter's model card (`README.md`, replacing peft's empty template) and record
    the logical base model name in every `adapter_config.json` of the folder.

    `base_model_name_or_path` is a name, not a path (the folder moves): load the base yourself
    (`babelcap.models.clip.load_clip(PATH)`) and attach the adapter to its text tower, as the
    card shows. The card: base model, languages, adapter kind/rank/targets/size, the data
    (shard folders by name, languages, origins, splits) and the training metrics, read from the
    run folder (`run_dir`, default the folder above `out_dir`, where the trainer writes it).
    """
    import json

    raw = unwrap(model)
    out = Path(out_dir)
    base = base_model or logical_base_name(raw) or "unknown"
    for cfg_path in [out / CONFIG_FILE, *out.glob(f"*/{CONFIG_FILE}")]:
        if cfg_path.is_file():
            data = json.loads(cfg_path.read_text())
            data["base_model_name_or_path"] = base
            cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    run = _run_info(Path(run_dir) if run_dir is not None else out.parent)
    cfg = run.get("config") or {}
    data_cfg, optim = cfg.get("data") or {}, cfg.get("optim") or {}
    names = language_adapters(raw)
    per_language = [n for n in names if n != SHARED]
    languages = per_language or list(data_cfg.get("languages") or [])
    peft_cfgs = raw.text.peft_config
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {json.dumps(base)}",
        "tags: [babelcap, clip, open_clip, "
        + ", ".join(sorted({c.peft_type.value.lower() for c in peft_cfgs.values()}))
        + "]",
    ]
    if languages:
        lines.append("language: [" + ", ".join(json.dumps(x) for x in languages) + "]")
    lines += [
        "---",
        "",
        f"# babelcap adapter for `{base}`" + (f" ({', '.join(languages)})" if languages else ""),
        "",
        "A parameter-efficient adapter on the Hugging Face text tower of an open_clip CLIP model, "
        "trained by babelcap. The image tower is the base model's, unchanged.",
        "",
        f"- **Base model:** `{base}` (a logical name: `base_model_name_or_path` in "
        "`adapter_config.json`; point the loader below at your copy of it)",
        f"- **Languages:** {', '.join(languages) if languages else 'not recorded'}",
    ]
    for name, pc in peft_cfgs.items():
        size = adapter_size(raw, name)["parameters"]
        label = "" if name == SHARED else f" `{name}` (folder `{name}/`)"
        settings = (
            f"r={pc.r}, alpha={pc.lora_alpha}, dropout={pc.lora_dropout}"
            if hasattr(pc, "r")
            else ""
        )
        targets = ", ".join(sorted(pc.target_modules)) if pc.target_modules else ""
        saved = ", ".join(pc.modules_to_save or []) or "none"
        lines.append(
            f"- **Adapter{label}:** {pc.peft_type.value} {settings} on {targets}; modules saved: "
            f"{saved}; {size:,} parameters"
        )
    if data_cfg:
        shards = ", ".join(_portable(p) for p in (data_cfg.get("train") or [])) or "n/a"
        lines.append(
            f"- **Data:** {shards}; caption languages {data_cfg.get('languages')}, origins "
            f"{data_cfg.get('origins')}, splits {data_cfg.get('splits')}, batch size "
            f"{data_cfg.get('batch_size')}"
        )
    last = run.get("last_metrics") or {}
    if last:
        lines.append(
            f"- **Training:** {last.get('step')} steps, final loss {last.get('loss'):.4f}, "
            f"peak lr {optim.get('lr')}"
            if isinstance(last.get("loss"), (int, float))
            else f"- **Training:** {last}"
        )
    lines += [
        "- **Evaluation:** `babelcap eval --model adapted=BASE --adapter adapted=THIS_FOLDER ...` "
        "(retrieval recall per language)",
        "",
        "## Load",
        "",
        "```python",
        "from peft import PeftModel",
        "from babelcap.models.clip import load_clip",
        "",
        f'bundle = load_clip("path/to/{base}")  # the base model',
        'bundle.model.text = PeftModel.from_pretrained(bundle.model.text, "path/to/this/folder")',
        "```",
        "",
    ]
    card = out / CARD_FILE
    card.write_text("\n".join(lines))
    return card


def adapter_dirs(adapter_dir: str | Path) -> dict[str, Path]:
    """Adapters saved in a folder: {name: dir} (`default` at the top, languages in subfolders)."""
    root = Path(adapter_dir)
    found: dict[str, Path] = {}
    if (root / CONFIG_FILE).exists():
        found[SHARED] = root
    for sub in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if (sub / CONFIG_FILE).exists():
            found[sub.name] = sub
    return found


def is_language_adapter_dir(adapter_dir: str | Path) -> bool:
    """True when the folder holds per-language adapters (subfolders named by language)."""
    return any(name != SHARED for name in adapter_dirs(adapter_dir))


def load_language_adapters(
    model: torch.nn.Module,
    adapter_dir: str | Path,
    languages: Sequence[str] | None = None,
    trainable: bool = False,
) -> torch.nn.Module:
    """Attach saved adapters (all, or those of `languages`) to a base model's text tower."""
    from peft import PeftModel

    raw = unwrap(model)
    found = adapter_dirs(adapter_dir)
    if languages is not None:
        missing = [lang for lang in languages if lang not in found]
        if missing:
            raise FileNotFoundError(
                f"{adapter_dir}: no adapter for {missing}; found {sorted(found)}"
            )
        found = {k: v for k, v in found.items() if k in languages}
    if not found:
        raise FileNotFoundError(f"{adapter_dir}: no peft adapter ({CONFIG_FILE}) found")
    items = list(found.items())
    name, path = items[0]
    raw.text = PeftModel.from_pretrained(
        raw.text, str(path), adapter_name=name, is_trainable=trainable
    )
    for name, path in items[1:]:
        raw.text.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    return model


# ----------------------------------------------------------------------------- evaluation


def evaluate_with_adapters(
    bundle: Any,
    data: Any,
    name: str = "model",
    zero_shot: bool = True,
    training_images: Any = "recorded",
    allow_contamination: bool = False,
) -> dict[str, Any]:
    """`training.evaluate.evaluate`, each language through its own adapter (`use_language`);
    the contamination check runs once."""
    from babelcap.training.evaluate import check_contamination, evaluate

    checked = check_contamination(bundle, data, training_images, allow_contamination)
    result: dict[str, Any] = {
        "model": name,
        "images": len(data.images),
        "contamination": checked,
        "languages": {},
    }
    for lang, texts in data.texts.items():
        if not texts:
            continue
        one = data.only([lang])
        with use_language(bundle.model, lang) as adapter:
            part = evaluate(bundle, one, name=name, zero_shot=zero_shot, contamination=checked)
        result["languages"][lang] = {**part["languages"][lang], "adapter": adapter}
    return result


# ----------------------------------------------------------------------------- disparity


def spread(values: Mapping[str, float]) -> dict[str, float]:
    """Disparity between languages: max - min and population standard deviation."""
    xs = [float(v) for v in values.values()]
    if not xs:
        return {"max_min": math.nan, "std": math.nan, "mean": math.nan}
    return {"max_min": max(xs) - min(xs), "std": statistics.pstdev(xs), "mean": sum(xs) / len(xs)}
