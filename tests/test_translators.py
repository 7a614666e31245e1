"""The CTranslate2 engine on tiny randomly initialised models of each family, built and saved
here in transformers format and converted with `translators.convert_model`.

Random weights make the translations gibberish, so correctness is checked against
transformers' own `generate` on the same model (the conversion round trip), and the engine's
bookkeeping (order, memory, empty and over-long input) against the engine itself.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from babelcap.translators import (
    Translator,
    TranslatorConfig,
    convert_model,
    read_model_info,
    resolve,
)
from babelcap.translators.engine import split_pieces
from babelcap.translators.languages import known_languages
from babelcap.translators.memory import normalize

SENTENCES = [
    "a red circle above a blue square",
    "two green triangles on the left",
    "a photo of a small yellow star",
    "an image of three purple hearts",
    "um círculo vermelho acima de um quadrado azul",
    "dois triângulos verdes à esquerda",
    "uma foto de uma pequena estrela amarela",
    "uma imagem de três corações roxos",
]
TEXTS = [
    "a red circle",
    "two green triangles on the left of a big blue square",
    "a star",
    "an image of three purple hearts above a small yellow star",
    "a heart",
]


def _spm(tmp: Path, **ids) -> Path:
    import sentencepiece as spm

    text = tmp / "text.txt"
    text.write_text("\n".join(SENTENCES * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp / "sp"),
        vocab_size=60,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **ids,
    )
    return tmp / "sp.model"


def _tiny(**extra):
    return dict(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        **extra,
    )


def make_marian(out: Path) -> Path:
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    out.mkdir(parents=True)
    model_file = _spm(out.parent, pad_id=-1, bos_id=-1, eos_id=0, unk_id=1)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for name in ("source.spm", "target.spm"):
        (out / name).write_bytes(model_file.read_bytes())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    tok = MarianTokenizer(
        str(out / "source.spm"),
        str(out / "target.spm"),
        str(out / "vocab.json"),
        source_lang="en",
        target_lang="pt",
    )
    torch.manual_seed(0)
    model = MarianMTModel(
        MarianConfig(
            **_tiny(
                vocab_size=len(vocab),
                pad_token_id=vocab["<pad>"],
                eos_token_id=0,
                decoder_start_token_id=vocab["<pad>"],
                forced_eos_token_id=None,
            )
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_m2m(out: Path) -> Path:
    import sentencepiece as spm
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    out.mkdir(parents=True)
    model_file = _spm(out.parent, pad_id=-1, bos_id=-1, eos_id=0, unk_id=1)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    (out / "sentencepiece.bpe.model").write_bytes(model_file.read_bytes())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab))
    tok = M2M100Tokenizer(
        str(out / "vocab.json"),
        str(out / "sentencepiece.bpe.model"),
        src_lang="en",
        tgt_lang="pt",
        num_madeup_words=0,
    )
    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(
        M2M100Config(
            **_tiny(
                vocab_size=tok.encoder_size + len(tok.lang_token_to_id),
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                decoder_start_token_id=2,
            )
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_nllb(out: Path) -> Path:
    """An NLLB-style model: M2M100 weights with an NllbTokenizer (tokenizer.json only)."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    out.mkdir(parents=True)
    chars = sorted({c for s in SENTENCES for c in s if c != " "})
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "▁": 4}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = NllbTokenizer(vocab=vocab, merges=[], src_lang="eng_Latn", tgt_lang="por_Latn")
    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(
        M2M100Config(
            **_tiny(
                vocab_size=len(tok),
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                decoder_start_token_id=2,
            )
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tiny-translators")
    out = {}
    for name, make, langs in (
        ("marian", make_marian, None),
        ("m2m100", make_m2m, ["en", "pt", "de"]),
        ("nllb", make_nllb, None),
    ):
        hf = make(root / name / "hf")
        ct2 = convert_model(hf, root / name / "ct2", languages=langs)
        out[name] = {"hf": hf, "ct2": ct2}
    return out


def _hf_generate(hf_dir: Path, texts: list[str], family: str, tgt: str | None, n: int):
    """Source tokens and greedy `generate` output tokens of the original transformers model."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
    kwargs = {}
    if family != "marian":
        tok.src_lang = "en" if family == "m2m100" else "eng_Latn"
        kwargs["forced_bos_token_id"] = tok.convert_tokens_to_ids(tgt)
    else:  # CTranslate2 drops Marian's <pad> from the vocabulary, so it is never generated
        kwargs["bad_words_ids"] = [[tok.pad_token_id]]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=n, do_sample=False, num_beams=1, **kwargs)
    sources = [tok.convert_ids_to_tokens(tok(t)["input_ids"]) for t in texts]
    outputs = [tok.convert_ids_to_tokens(row[1:]) for row in ids]  # minus the start token
    outputs = [[t for t in row if t != tok.pad_token] for row in outputs]
    return sources, outputs


# -- conversion --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["marian", "m2m100", "nllb"])
def test_conversion_round_trip_matches_transformers(models, family):
    ct2 = models[family]["ct2"]
    meta = json.loads((ct2 / "babelcap-translator.json").read_text())
    assert meta["family"] == family and meta["source_model"] == str(models[family]["hf"])
    info = read_model_info(ct2)
    assert info.family == family and info.model_id == meta["model_id"]
    # self-contained: the tokenizer travelled with the weights
    expected = {
        "marian": ["source.spm", "target.spm"],
        "m2m100": ["sentencepiece.bpe.model"],
        "nllb": ["tokenizer.json"],
    }[family]
    assert all((ct2 / f).exists() for f in expected)

    tgt_token = {"marian": None, "m2m100": "__pt__", "nllb": "por_Latn"}[family]
    n = 6  # a random model rarely stops by itself: compare a fixed number of tokens
    engine = Translator(ct2, compute_type="float32", max_decoding_length=n).load()
    codec = engine.codec
    src_tok, tgt_tok = codec.language_tokens(resolve("en"), resolve("pt"))
    assert tgt_tok == tgt_token
    sources = [codec.build_source(codec.encode(t), src_tok, tgt_tok) for t in TEXTS]
    results = engine.model.translate_batch(
        sources,
        target_prefix=[codec.target_prefix(tgt_tok)] * len(TEXTS) if tgt_tok else None,
        max_decoding_length=n,
        beam_size=1,
    )
    hf_sources, hf_outputs = _hf_generate(models[family]["hf"], TEXTS, family, tgt_token, n)
    assert sources == hf_sources  # same tokenisation, language token included
    assert [r.hypotheses[0] for r in results] == hf_outputs  # same weights, same decoding
    # and the engine returns exactly those translations, decoded, in order
    assert engine.translate(TEXTS, "en", "pt") == [
        codec.decode(r.hypotheses[0], tgt_tok) for r in results
    ]


def test_converted_m2m100_keeps_its_language_tokens(models):
    # transformers 5 no longer lists them as added tokens; the converter must keep them
    vocab = json.loads((models["m2m100"]["ct2"] / "shared_vocabulary.json").read_text())
    assert {"__en__", "__pt__", "__hi__"} <= set(vocab)


def test_convert_rejects_bad_quantization_and_existing_dir(models, tmp_path):
    with pytest.raises(ValueError, match="quantization"):
        convert_model(models["marian"]["hf"], tmp_path / "x", quantization="int3")
    with pytest.raises(FileExistsError):
        convert_model(models["marian"]["hf"], models["marian"]["ct2"])


def test_int8_conversion_is_smaller(models, tmp_path):
    out = convert_model(models["marian"]["hf"], tmp_path / "int8", quantization="int8")
    assert (out / "model.bin").stat().st_size < (
        models["marian"]["ct2"] / "model.bin"
    ).stat().st_size
    assert Translator(out).translate(["a red circle"], "en", "pt")[0]


def test_family_comes_from_files_not_name(models, tmp_path):
    # A Marian model in a folder named like an NLLB model is still Marian.
    import shutil

    fake = tmp_path / "nllb-200-distilled-600M"
    shutil.copytree(models["marian"]["ct2"], fake)
    (fake / "babelcap-translator.json").unlink()  # without metadata: tokenizer_config / files
    assert read_model_info(fake).family == "marian"


# -- languages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["pt", "por", "pt-BR", "pt_PT", "por_Latn", "Portuguese", "PT"])
def test_language_codes_resolve(code):
    lang = resolve(code)
    assert (lang.code, lang.iso639_3, lang.nllb, lang.m2m_token) == (
        "pt",
        "por",
        "por_Latn",
        "__pt__",
    )


def test_language_table_and_scripts():
    codes = {lang.code for lang in known_languages()}
    assert {"en", "pt", "es", "de", "hi", "xh", "sw", "zh", "ar"} <= codes
    assert len(codes) >= 40
    assert resolve("zh-Hant").nllb == "zho_Hant" and resolve("zh").nllb == "zho_Hans"
    assert resolve("iw").code == "he" and resolve("ger").code == "de"
    assert resolve("hin_Deva").code == "hi"


@pytest.mark.parametrize("code", ["xx", "", "klingon", "zz-ZZ"])
def test_unknown_language_code_lists_known(code):
    with pytest.raises(ValueError, match="pt") as err:
        resolve(code)
    assert "code" in str(err.value)


def test_unsupported_pair_is_a_clear_error(models):
    m2m = Translator(models["m2m100"]["ct2"])
    with pytest.raises(ValueError, match=r"en->fr.*target languages: de, en, pt"):
        m2m.translate(["a red circle"], "en", "fr")
    marian = Translator(models["marian"]["ct2"])
    with pytest.raises(ValueError, match=r"de->pt.*source languages: en"):
        marian.translate(["a red circle"], "de", "pt")
    nllb = Translator(models["nllb"]["ct2"])
    assert "por_Latn" in nllb.supported_languages()[1]
    assert nllb.translate(["a red circle"], "en", "pt-BR")  # BCP-47 -> por_Latn


# -- engine behaviour --------------------------------------------------------------------------
def test_order_of_mixed_inputs(models):
    # (length sorting proper is checked on the world model, whose outputs differ per input)
    engine = Translator(models["m2m100"]["ct2"], max_decoding_length=5, max_batch_size=8)
    texts = ["", TEXTS[1], " ", TEXTS[0], TEXTS[1], ""]
    out = engine.translate(texts, "en", "de")
    assert len(out) == len(texts) and out[0] == out[2] == out[5] == ""
    assert out[1] == out[4] == engine.translate([TEXTS[1]], "en", "de")[0]


def test_translation_memory_within_and_across_batches(models, tmp_path):
    cache = tmp_path / "memory.sqlite"
    engine = Translator(models["marian"]["ct2"], max_decoding_length=5, cache_path=str(cache))
    texts = ["a red circle", "a  red circle ", "a star", "a red circle"]
    first = engine.translate(texts, "en", "pt")
    assert first[0] == first[1] == first[3]
    assert engine.stats.translated == 2 and engine.stats.duplicates == 2
    second = engine.translate(["a star", "a red circle", "a heart"], "en", "pt")
    assert second[:2] == [first[2], first[0]]
    assert engine.stats.cache_hits == 2 and engine.stats.translated == 3

    # a new process (here: a new engine) finds them on disk
    again = Translator(models["marian"]["ct2"], max_decoding_length=5, cache_path=str(cache))
    assert again.translate(texts, "en", "pt") == first
    assert again.stats.cache_hits == 2 and again.stats.translated == 0
    assert again.memory.disk_hits == 2
    # other decoding options are other keys
    again.translate(["a star"], "en", "pt", beam_size=2, num_hypotheses=2)
    assert again.stats.translated == 1


def test_normalize():
    assert normalize("  a\u00a0 red\tcircle \n") == "a red circle"
    assert normalize("e\u0301") == "\u00e9"
    assert normalize("A Red") != normalize("a red")  # case is meaning


def test_empty_input_does_not_reach_the_model(models):
    engine = Translator(models["marian"]["ct2"], max_decoding_length=5)
    assert engine.translate(["", "   ", "\n\t"], "en", "pt") == ["", "", ""]
    assert engine.translate([], "en", "pt") == []
    assert engine.stats.empty == 3 and engine.stats.translated == 0
    assert engine.stats.output_tokens == 0
    mixed = engine.translate(["", "a star", " "], "en", "pt")
    assert mixed[0] == mixed[2] == "" and mixed[1]


def test_over_long_input_truncated_or_split(models):
    ct2 = models["marian"]["ct2"]
    long_text = " ".join(["a red circle above a blue square."] * 6)
    codec = Translator(ct2).codec
    n_tokens = len(codec.encode(long_text))
    per_sentence = len(codec.encode("a red circle above a blue square."))
    limit = 2 * per_sentence + 2  # tokens including </s>: two sentences and a bit fit
    assert n_tokens > limit

    trunc = Translator(ct2, max_input_length=limit, overlong="truncate", max_decoding_length=4)
    out = trunc.translate([long_text], "en", "pt")
    assert trunc.stats.truncated == 1 and trunc.stats.split == 0 and out[0]

    split = Translator(
        ct2, max_input_length=limit, overlong="split", max_decoding_length=4, memory_size=0
    )
    out = split.translate([long_text, "a star"], "en", "pt")
    assert split.stats.split == 1 and split.stats.truncated == 0
    # the pieces are translated one by one and joined in order
    pieces = split_pieces(split.codec.encode(long_text), limit - 1)
    assert len(pieces) >= 3 and all(len(p) <= limit - 1 for p in pieces)
    sp_text = ["".join(p).replace("▁", " ").strip() for p in pieces]
    assert sp_text[0].endswith("square.")  # cut at a sentence end, not mid-sentence
    assert len(pieces[0]) == 2 * per_sentence
    expected = " ".join(split.translate(sp_text, "en", "pt"))
    assert out[0] == expected and out[1] == split.translate(["a star"], "en", "pt")[0]


def test_split_pieces_prefers_boundaries():
    pieces = ["▁a", "▁red", "▁circle", ".", "▁two", "▁blue", "▁stars", "."]
    assert split_pieces(pieces, 5) == [pieces[:4], pieces[4:]]
    assert split_pieces(["x"] * 7, 3) == [["x"] * 3, ["x"] * 3, ["x"]]


def test_several_hypotheses_by_beam_and_sampling(models):
    engine = Translator(models["marian"]["ct2"], max_decoding_length=6, seed=1)
    beams = engine.translate_hypotheses(TEXTS[:2], "en", "pt", beam_size=4, num_hypotheses=3)
    assert [len(h) for h in beams] == [3, 3] and len(set(beams[0])) == 3
    samples = engine.translate_hypotheses(
        ["a red circle"] * 2,
        "en",
        "pt",
        num_hypotheses=4,
        sampling_topk=0,
        sampling_temperature=1.5,
    )
    assert [len(h) for h in samples] == [4, 4]
    assert len(set(samples[0] + samples[1])) > 1  # sampled, not one frozen draw
    assert engine.stats.cache_hits == 0


def test_pickles_as_config_and_reloads(models):
    engine = Translator(
        TranslatorConfig(model_dir=str(models["marian"]["ct2"]), max_decoding_length=5)
    )
    expected = engine.translate(TEXTS, "en", "pt")
    clone = pickle.loads(pickle.dumps(engine))
    assert not clone.loaded and clone.config == engine.config
    assert clone.translate_batch(TEXTS, "en", "pt") == expected


def test_device_and_compute_type_defaults(models):
    import ctranslate2

    engine = Translator(models["marian"]["ct2"]).load()
    if ctranslate2.get_cuda_device_count() == 0:
        assert (engine.device, engine.compute_type) == ("cpu", "int8")
    else:
        assert engine.device == "cuda" and engine.compute_type in ("int8_float16", "float16")


def test_rejects_non_strings_and_bad_config(models):
    engine = Translator(models["marian"]["ct2"])
    with pytest.raises(TypeError):
        engine.translate([None], "en", "pt")
    with pytest.raises(ValueError, match="overlong"):
        TranslatorConfig(model_dir="x", overlong="drop")
    with pytest.raises(FileNotFoundError, match="convert-translator"):
        Translator("/nonexistent").translate(["a"], "en", "pt")


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_convert_and_translate(models, tmp_path, capsys):
    from babelcap.cli import main

    out = tmp_path / "cli-ct2"
    assert (
        main(
            [
                "convert-translator",
                str(models["m2m100"]["hf"]),
                "--out",
                str(out),
                "--quantization",
                "int8",
                "--languages",
                "en,pt",
            ]
        )
        == 0
    )
    assert "m2m100" in capsys.readouterr().out
    src = tmp_path / "in.txt"
    src.write_text("a red circle\n\na star\na red circle\n", encoding="utf-8")
    dst = tmp_path / "out.txt"
    assert (
        main(
            [
                "translate",
                "--model",
                str(out),
                "--src",
                "en",
                "--tgt",
                "pt",
                "--input",
                str(src),
                "--output",
                str(dst),
                "--chunk",
                "2",
            ]
        )
        == 0
    )
    lines = dst.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 5 and lines[-1] == "" and lines[1] == "" and lines[0] == lines[3]
    assert "1 from memory" in capsys.readouterr().err  # the repeat came from the memory
    # a pair the model does not serve: exit code 2 and a message, no traceback
    assert (
        main(["translate", "--model", str(out), "--src", "en", "--tgt", "hi", "--input", str(src)])
        == 2
    )
    assert "cannot translate en->hi" in capsys.readouterr().err
