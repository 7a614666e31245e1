"""babelcap's CTranslate2 NMT engine: conversion from Hugging Face models, tokenisation per
model family (Marian, M2M100, NLLB), language codes, batching and a translation memory.

    from babelcap.translators import Translator, convert_model
    convert_model("Helsinki-NLP/opus-mt-en-ROMANCE", "models/en-romance", quantization="int8")
    Translator("models/en-romance").translate(["a red circle"], src="en", tgt="pt")
"""

from babelcap.translators.convert import convert_model
from babelcap.translators.engine import TranslationStats, Translator, TranslatorConfig
from babelcap.translators.languages import Language, known_languages, resolve
from babelcap.translators.memory import TranslationMemory, normalize
from babelcap.translators.model_info import ModelInfo, read_model_info

__all__ = [
    "Language",
    "ModelInfo",
    "TranslationMemory",
    "TranslationStats",
    "Translator",
    "TranslatorConfig",
    "convert_model",
    "known_languages",
    "normalize",
    "read_model_info",
    "resolve",
]
