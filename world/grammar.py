"""Hand-written grammars: parallel alt-text captions of a scene in five languages.

`describe(scene, lang, k)` is the k-th paraphrase; paraphrase k in every language translates
English paraphrase k, so the gold files form a parallel corpus. Noun phrases agree in gender,
number and (German) case or (Hindi) directness; captions are lower case without a final period,
as alt-text usually is (German nouns keep their capital letter, as German spelling requires).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

from babelcap.world import lexicon as lx
from babelcap.world.lexicon import class_names, word_forms
from babelcap.world.scene import (
    COLOURS,
    REGIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Background,
    Obj,
    Scene,
    region,
)

__all__ = [
    "LANGUAGES",
    "NUM_VARIANTS",
    "class_names",
    "describe",
    "describe_all",
    "tokens",
    "vocabulary_words",
    "word_forms",
]

LANGUAGES = ("en", "pt", "es", "de", "hi")
NUM_VARIANTS = 6
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}

Kind = tuple[str, str, str]  # (shape, colour, size)


@dataclass(frozen=True)
class Content:
    """What a caption says, independent of language."""

    form: str  # "single" | "relation" | "list"
    groups: tuple[tuple[Kind, int], ...]  # relation: (subject, reference)
    relation: str | None = None
    region: str | None = None

    @property
    def plural(self) -> bool:
        """Whether the sentence subject is plural (a list of more than one object)."""
        return self.form == "list" and sum(n for _, n in self.groups) > 1

    def flipped(self) -> Content:
        """The same scene said the other way round: inverse relation, or reversed list."""
        if self.form == "relation":
            return Content("relation", self.groups[::-1], _INVERSE[self.relation])
        return Content(self.form, self.groups[::-1], None, self.region)


def content_of(scene: Scene) -> Content:
    objs = scene.objects
    if len(objs) == 1:
        return Content("single", ((objs[0].kind, 1),), None, region(objs[0]))
    if len(objs) == 2 and scene.relation is not None:
        return Content("relation", ((objs[0].kind, 1), (objs[1].kind, 1)), scene.relation)
    counts: dict[Kind, int] = {}
    for o in objs:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    return Content("list", tuple(counts.items()))


class _Grammar:
    """Shared machinery: a language supplies noun groups, relations, places and templates."""

    RELATIONS: ClassVar[dict[str, str]]
    JOIN: str
    REF_CASE: str | None = None  # case of the reference object after a relation word

    def group(self, kind: Kind, count: int, case: str | None) -> str:
        raise NotImplementedError

    def relation(self, subject: str, rel: str, reference: str) -> str:
        return f"{subject} {self.RELATIONS[rel]} {reference}"

    def join(self, parts: list[str]) -> str:
        return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} {self.JOIN} {parts[-1]}"

    def np(self, c: Content, case: str | None = None) -> str:
        if c.form == "relation":
            (x, _), (y, _) = c.groups
            return self.relation(
                self.group(x, 1, case), c.relation, self.group(y, 1, self.REF_CASE)
            )
        return self.join([self.group(k, n, case) for k, n in c.groups])

    def captions(self, c: Content) -> list[str]:
        raise NotImplementedError


def _space(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


class English(_Grammar):
    RELATIONS: ClassVar[dict[str, str]] = {
        "left": "to the left of",
        "right": "to the right of",
        "above": "above",
        "below": "below",
    }
    JOIN = "and"
    PLACE: ClassVar[dict[str, str]] = {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "middle": "in the middle",
    }

    def group(self, kind: Kind, count: int, case: str | None) -> str:
        shape, colour, size = kind
        number = {1: "a", 2: "two", 3: "three"}[count]
        noun = lx.EN_SHAPES[shape][0 if count == 1 else 1]
        return f"{number} {lx.EN_SIZES[size]} {lx.EN_COLOURS[colour]} {noun}"

    def captions(self, c: Content) -> list[str]:
        np = self.np(c)
        place = self.PLACE.get(c.region) if c.region else None
        return [
            _space(np, place),
            f"a photo of {np}",
            _space(f"a picture of {np}", place and f"{place} of the image"),
            f"an image showing {np}",
            f"there {'are' if c.plural else 'is'} {np}",
            f"an image of {self.np(c.flipped())}",
        ]


class _Romance(_Grammar):
    SHAPES: ClassVar[dict]
    COLOURS: ClassVar[dict]
    SIZES: ClassVar[dict]
    NUMBERS: ClassVar[dict]
    PLACE: ClassVar[dict[str, str]]
    PLACE_IN_IMAGE: ClassVar[dict[str, str]]

    def group(self, kind: Kind, count: int, case: str | None) -> str:
        shape, colour, size = kind
        gender, sg, pl = self.SHAPES[shape]
        slot = (0 if gender == "m" else 1) + (0 if count == 1 else 2)
        number = self.NUMBERS[count][0 if gender == "m" else 1]
        noun = sg if count == 1 else pl
        # Romance order: noun, colour, size ("um círculo vermelho grande").
        return f"{number} {noun} {self.COLOURS[colour][slot]} {self.SIZES[size][slot]}"


class Portuguese(_Romance):
    SHAPES, COLOURS, SIZES, NUMBERS = lx.PT_SHAPES, lx.PT_COLOURS, lx.PT_SIZES, lx.PT_NUMBERS
    RELATIONS: ClassVar[dict[str, str]] = {
        "left": "à esquerda de",
        "right": "à direita de",
        "above": "acima de",
        "below": "abaixo de",
    }
    JOIN = "e"
    PLACE: ClassVar[dict[str, str]] = {
        "left": "à esquerda",
        "right": "à direita",
        "top": "em cima",
        "bottom": "embaixo",
        "middle": "no centro",
    }
    PLACE_IN_IMAGE: ClassVar[dict[str, str]] = {
        "left": "à esquerda da imagem",
        "right": "à direita da imagem",
        "top": "no topo da imagem",
        "bottom": "na parte de baixo da imagem",
        "middle": "no centro da imagem",
    }

    def captions(self, c: Content) -> list[str]:
        np = self.np(c)
        return [
            _space(np, self.PLACE.get(c.region)),
            f"uma foto de {np}",
            _space(f"uma figura de {np}", self.PLACE_IN_IMAGE.get(c.region)),
            f"uma imagem mostrando {np}",
            f"há {np}",
            f"uma imagem de {self.np(c.flipped())}",
        ]


class Spanish(_Romance):
    SHAPES, COLOURS, SIZES, NUMBERS = lx.ES_SHAPES, lx.ES_COLOURS, lx.ES_SIZES, lx.ES_NUMBERS
    RELATIONS: ClassVar[dict[str, str]] = {
        "left": "a la izquierda de",
        "right": "a la derecha de",
        "above": "encima de",
        "below": "debajo de",
    }
    JOIN = "y"
    PLACE: ClassVar[dict[str, str]] = {
        "left": "a la izquierda",
        "right": "a la derecha",
        "top": "arriba",
        "bottom": "abajo",
        "middle": "en el centro",
    }
    PLACE_IN_IMAGE: ClassVar[dict[str, str]] = {
        "left": "a la izquierda de la imagen",
        "right": "a la derecha de la imagen",
        "top": "en la parte superior de la imagen",
        "bottom": "en la parte inferior de la imagen",
        "middle": "en el centro de la imagen",
    }

    def captions(self, c: Content) -> list[str]:
        np = self.np(c)
        return [
            _space(np, self.PLACE.get(c.region)),
            f"una foto de {np}",
            _space(f"una figura de {np}", self.PLACE_IN_IMAGE.get(c.region)),
            f"una imagen que muestra {np}",
            f"hay {np}",
            f"una imagen de {self.np(c.flipped())}",
        ]


class German(_Grammar):
    # Local prepositions take the dative: "links von einem roten Kreis", "über einer Raute".
    RELATIONS: ClassVar[dict[str, str]] = {
        "left": "links von",
        "right": "rechts von",
        "above": "über",
        "below": "unter",
    }
    REF_CASE = "dat"
    JOIN = "und"
    PLACE: ClassVar[dict[str, str]] = {
        "left": "links",
        "right": "rechts",
        "top": "oben",
        "bottom": "unten",
        "middle": "in der Mitte",
    }
    PLACE_IN_IMAGE: ClassVar[dict[str, str]] = {
        "left": "auf der linken Seite des Bildes",
        "right": "auf der rechten Seite des Bildes",
        "top": "im oberen Teil des Bildes",
        "bottom": "im unteren Teil des Bildes",
        "middle": "in der Mitte des Bildes",
    }

    def group(self, kind: Kind, count: int, case: str | None) -> str:
        shape, colour, size = kind
        case = case or "nom"
        gender, sg, pl, dat_pl = lx.DE_SHAPES[shape]
        if count == 1:
            article, ending, noun = (
                lx.DE_ARTICLE[gender, case],
                lx.DE_MIXED_ENDING[gender, case],
                sg,
            )
        else:
            article, ending = lx.DE_NUMBERS[count], lx.DE_PLURAL_ENDING[case]
            noun = dat_pl if case == "dat" else pl
        return f"{article} {lx.DE_SIZES[size]}{ending} {lx.DE_COLOURS[colour]}{ending} {noun}"

    def captions(self, c: Content) -> list[str]:
        return [
            _space(self.np(c, "nom"), self.PLACE.get(c.region)),
            f"ein Foto von {self.np(c, 'dat')}",
            _space(f"ein Bild von {self.np(c, 'dat')}", self.PLACE_IN_IMAGE.get(c.region)),
            f"eine Abbildung, die {self.np(c, 'acc')} zeigt",
            f"es gibt {self.np(c, 'acc')}",
            f"eine Abbildung von {self.np(c.flipped(), 'dat')}",
        ]


class Hindi(_Grammar):
    # Postpositions follow the (oblique) reference: "एक लाल तारे के बाईं ओर एक नीला वर्ग".
    RELATIONS: ClassVar[dict[str, str]] = {
        "left": "के बाईं ओर",
        "right": "के दाईं ओर",
        "above": "के ऊपर",
        "below": "के नीचे",
    }
    REF_CASE = "obl"
    JOIN = "और"
    PLACE: ClassVar[dict[str, str]] = {
        "left": "बाईं ओर",
        "right": "दाईं ओर",
        "top": "ऊपर",
        "bottom": "नीचे",
        "middle": "बीच में",
    }

    def group(self, kind: Kind, count: int, case: str | None) -> str:
        shape, colour, size = kind
        oblique = case == "obl"
        gender, sg, pl, sg_obl, pl_obl = lx.HI_SHAPES[shape]
        plural = count > 1
        noun = (pl_obl if oblique else pl) if plural else (sg_obl if oblique else sg)
        adjs = [
            lx.hi_adjective(a, gender, plural, oblique)
            for a in (lx.HI_SIZES[size], lx.HI_COLOURS[colour])
        ]
        return f"{lx.HI_NUMBERS[count]} {adjs[0]} {adjs[1]} {noun}"

    def relation(self, subject: str, rel: str, reference: str) -> str:
        return f"{reference} {self.RELATIONS[rel]} {subject}"

    def captions(self, c: Content) -> list[str]:
        copula = "हैं" if c.plural else "है"
        place = self.PLACE.get(c.region)
        return [
            _space(self.np(c, "dir"), place),
            f"{self.np(c, 'obl')} की फ़ोटो",
            _space("एक चित्र जिसमें", place, self.np(c, "dir"), copula),
            f"{self.np(c, 'obl')} को दिखाती एक छवि",
            f"{self.np(c, 'dir')} {copula}",
            f"{self.np(c.flipped(), 'obl')} की छवि",
        ]


_GRAMMARS: dict[str, _Grammar] = {
    "en": English(),
    "pt": Portuguese(),
    "es": Spanish(),
    "de": German(),
    "hi": Hindi(),
}


def _check_lang(lang: str) -> _Grammar:
    if lang not in _GRAMMARS:
        raise ValueError(f"unknown language {lang!r}; known: {', '.join(LANGUAGES)}")
    return _GRAMMARS[lang]


def describe_all(scene: Scene, lang: str) -> list[str]:
    """All NUM_VARIANTS paraphrases of a scene in one language (index k parallel across langs)."""
    return [unicodedata.normalize("NFC", s) for s in _check_lang(lang).captions(content_of(scene))]


def describe(scene: Scene, lang: str, variant: int) -> str:
    if not 0 <= variant < NUM_VARIANTS:
        raise ValueError(f"variant must be in [0, {NUM_VARIANTS}), got {variant}")
    return describe_all(scene, lang)[variant]


def tokens(text: str) -> list[str]:
    """Words of a caption (punctuation dropped), as the vocabulary counts them."""
    return re.findall(r"[^\s,]+", text)


def _covering_scenes() -> list[Scene]:
    """Scenes that together use every word a grammar can produce (for vocabularies)."""
    bg = Background("flat", (128, 128, 128), (128, 128, 128), 0)
    spots = {
        "left": (0.25, 0.5),
        "right": (0.75, 0.5),
        "top": (0.5, 0.25),
        "bottom": (0.5, 0.75),
        "middle": (0.5, 0.5),
    }
    assert set(spots) == set(REGIONS)
    scenes = []
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for x, y in spots.values():
                    scenes.append(Scene((Obj(shape, colour, size, x, y),), bg))
                a, b = Obj(shape, colour, size, 0, 0), Obj("circle", "red", "big", 1, 1)
                for rel in RELATIONS:
                    scenes.append(Scene((a, b), bg, rel))
                scenes.append(Scene((a, a, b), bg))
                scenes.append(Scene((a, a, a), bg))
    return scenes


@cache
def _vocabulary(lang: str) -> frozenset[str]:
    words: set[str] = set()
    for scene in _covering_scenes():
        for caption in describe_all(scene, lang):
            words.update(tokens(caption))
    return frozenset(words)


def vocabulary_words(lang: str) -> set[str]:
    """Every word the grammar of `lang` can write (for tokenizers and vocabularies)."""
    _check_lang(lang)
    return set(_vocabulary(lang))
