"""Exports that move: a merged open_clip export and a peft adapter, copied elsewhere with the
original deleted, load in plain open_clip (local-dir) and peft and give the same embeddings;
no file in them names a path of the machine that wrote them; the adapter has a real card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

TEXTS = ["uma estrela vermelha grande", "a small blue drop", "दो हरे वृत्त"]


@pytest.fixture(scope="module")
def adapted(world_models):
    """The world's CLIP with a LoRA on its text tower whose weights are not zero."""
    from babelcap.models.clip import load_clip
    from babelcap.training.lit import apply_lora

    base_dir = world_models("clip-base")["clip-base"]
    bundle = load_clip(str(base_dir))
    apply_lora(bundle.model, r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in bundle.model.text.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    bundle.model.eval()
    return bundle, base_dir


def _texts(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokenizer(TEXTS), normalize=True)


def test_export_and_adapter_move_and_load_in_open_clip_and_peft(
    adapted, world_dir, tmp_path, monkeypatch
):
    import open_clip
    from peft import PeftModel
    from PIL import Image

    from babelcap.models.clip import load_clip
    from babelcap.training.export import export_adapter, export_open_clip

    bundle, base_dir = adapted
    image_path = sorted((world_dir / "images" / "test").glob("*.png"))[0]
    image = bundle.preprocess_val(Image.open(image_path).convert("RGB")).unsqueeze(0)
    ref_text = _texts(bundle.model, bundle.tokenizer)
    with torch.no_grad():
        ref_image = bundle.model.encode_image(image, normalize=True)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"data:\n  train: [{tmp_path}/aug/shards]\n  languages: [pt]\n  origins: [translated]\n"
        "  splits: [train]\n  batch_size: 32\noptim:\n  lr: 0.003\n"
    )
    (run / "metrics.jsonl").write_text(json.dumps({"step": 20, "loss": 1.2345}) + "\n")
    export_open_clip(bundle, run / "export", name="moved-clip")
    export_adapter(bundle.model, run / "adapter")

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run, moved)
    shutil.rmtree(run)

    # Nothing in the folders names where they were written (or the base model's folder).
    for path in moved.rglob("*"):
        if path.suffix in (".json", ".md", ".txt") and path.is_file():
            text = path.read_text()
            for absolute in (str(tmp_path), str(base_dir), str(Path.cwd())):
                assert absolute not in text, f"{path.name} names {absolute}"
    export = moved / "export"
    local = json.loads((export / "open_clip_config.json").read_text())
    assert local["model_cfg"]["text_cfg"]["hf_model_name"] == "text"
    assert json.loads((export / "moved-clip.json").read_text())["text_cfg"][
        "hf_tokenizer_name"
    ] == ("text")

    # open_clip's tokenizer from any working directory; the model from the folder.
    monkeypatch.chdir(tmp_path)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    # (babelcap's wraps it to drop the padding past the longest text; open_clip pads to 77)
    assert torch.equal(tokenizer(TEXTS), bundle.tokenizer.inner(TEXTS))
    monkeypatch.chdir(export)
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
    model.eval()
    assert torch.equal(preprocess(Image.open(image_path).convert("RGB")).unsqueeze(0), image)
    torch.testing.assert_close(_texts(model, tokenizer), ref_text, atol=1e-5, rtol=0)
    with torch.no_grad():
        got_image = model.encode_image(image, normalize=True)
    torch.testing.assert_close(got_image, ref_image, atol=1e-6, rtol=0)

    # babelcap's loader: from any working directory.
    monkeypatch.chdir(tmp_path)
    again = load_clip(str(export))
    again.model.eval()
    torch.testing.assert_close(_texts(again.model, again.tokenizer), ref_text, atol=1e-5, rtol=0)

    # peft: the base model + the moved adapter give the merged export's embeddings.
    adapter = moved / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir.name == "clip-base"
    base = load_clip(str(base_dir))
    base.model.text = PeftModel.from_pretrained(base.model.text, str(adapter))
    base.model.eval()
    torch.testing.assert_close(_texts(base.model, base.tokenizer), ref_text, atol=1e-5, rtol=0)

    card = (adapter / "README.md").read_text()
    assert "[More Information Needed]" not in card  # not peft's empty template
    for expected in (
        'base_model: "clip-base"',
        'language: ["pt"]',
        "r=4, alpha=8",
        "query, value",
        "aug/shards",
        "splits ['train']",
        "20 steps, final loss 1.2345",
        "PeftModel.from_pretrained",
    ):
        assert expected in card, expected
