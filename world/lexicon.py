"""Word tables of the world's languages: shapes, colours, sizes, numbers, places.

Kept apart from the grammar so tests and zero-shot classifiers can read the words without the
sentence machinery. Nouns carry their gender; inflecting adjectives list their forms.
"""

from __future__ import annotations

# --- English -------------------------------------------------------------------------------
EN_SHAPES = {  # singular, plural
    "circle": ("circle", "circles"),
    "square": ("square", "squares"),
    "triangle": ("triangle", "triangles"),
    "star": ("star", "stars"),
    "hexagon": ("hexagon", "hexagons"),
    "diamond": ("diamond", "diamonds"),
    "cross": ("cross", "crosses"),
    "pentagon": ("pentagon", "pentagons"),
    "drop": ("drop", "drops"),
}
EN_COLOURS = {
    c: c for c in ("red", "green", "blue", "yellow", "orange", "purple", "black", "white")
}
EN_SIZES = {"small": "small", "big": "big"}

# --- Portuguese: nouns (gender, singular, plural); adjectives by (gender, number) --------------
PT_SHAPES = {
    "circle": ("m", "círculo", "círculos"),
    "square": ("m", "quadrado", "quadrados"),
    "triangle": ("m", "triângulo", "triângulos"),
    "star": ("f", "estrela", "estrelas"),
    "hexagon": ("m", "hexágono", "hexágonos"),
    "diamond": ("m", "losango", "losangos"),
    "cross": ("f", "cruz", "cruzes"),
    "pentagon": ("m", "pentágono", "pentágonos"),
    "drop": ("f", "gota", "gotas"),
}
# (masc sg, fem sg, masc pl, fem pl)
PT_COLOURS = {
    "red": ("vermelho", "vermelha", "vermelhos", "vermelhas"),
    "green": ("verde", "verde", "verdes", "verdes"),
    "blue": ("azul", "azul", "azuis", "azuis"),
    "yellow": ("amarelo", "amarela", "amarelos", "amarelas"),
    "orange": ("laranja",) * 4,  # colour nouns used as adjectives do not inflect
    "purple": ("roxo", "roxa", "roxos", "roxas"),
    "black": ("preto", "preta", "pretos", "pretas"),
    "white": ("branco", "branca", "brancos", "brancas"),
}
PT_SIZES = {
    "small": ("pequeno", "pequena", "pequenos", "pequenas"),
    "big": ("grande", "grande", "grandes", "grandes"),
}
PT_NUMBERS = {1: ("um", "uma"), 2: ("dois", "duas"), 3: ("três", "três")}

# --- Spanish -----------------------------------------------------------------------------------
ES_SHAPES = {
    "circle": ("m", "círculo", "círculos"),
    "square": ("m", "cuadrado", "cuadrados"),
    "triangle": ("m", "triángulo", "triángulos"),
    "star": ("f", "estrella", "estrellas"),
    "hexagon": ("m", "hexágono", "hexágonos"),
    "diamond": ("m", "rombo", "rombos"),
    "cross": ("f", "cruz", "cruces"),
    "pentagon": ("m", "pentágono", "pentágonos"),
    "drop": ("f", "gota", "gotas"),
}
ES_COLOURS = {
    "red": ("rojo", "roja", "rojos", "rojas"),
    "green": ("verde", "verde", "verdes", "verdes"),
    "blue": ("azul", "azul", "azules", "azules"),
    "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
    "orange": ("naranja",) * 4,
    "purple": ("morado", "morada", "morados", "moradas"),
    "black": ("negro", "negra", "negros", "negras"),
    "white": ("blanco", "blanca", "blancos", "blancas"),
}
ES_SIZES = {
    "small": ("pequeño", "pequeña", "pequeños", "pequeñas"),
    "big": ("grande", "grande", "grandes", "grandes"),
}
ES_NUMBERS = {1: ("un", "una"), 2: ("dos", "dos"), 3: ("tres", "tres")}

# --- German: nouns (gender, singular, plural, dative plural); adjective stems -------------------
DE_SHAPES = {
    "circle": ("m", "Kreis", "Kreise", "Kreisen"),
    "square": ("n", "Quadrat", "Quadrate", "Quadraten"),
    "triangle": ("n", "Dreieck", "Dreiecke", "Dreiecken"),
    "star": ("m", "Stern", "Sterne", "Sternen"),
    "hexagon": ("n", "Sechseck", "Sechsecke", "Sechsecken"),
    "diamond": ("f", "Raute", "Rauten", "Rauten"),
    "cross": ("n", "Kreuz", "Kreuze", "Kreuzen"),
    "pentagon": ("n", "Fünfeck", "Fünfecke", "Fünfecken"),
    "drop": ("m", "Tropfen", "Tropfen", "Tropfen"),
}
# "orange" and "lila" do not decline in standard German, so the declinable forms are used.
DE_COLOURS = {
    "red": "rot",
    "green": "grün",
    "blue": "blau",
    "yellow": "gelb",
    "orange": "orangefarben",
    "purple": "violett",
    "black": "schwarz",
    "white": "weiß",
}
DE_SIZES = {"small": "klein", "big": "groß"}
# Indefinite article by (gender, case); mixed-declension adjective endings after it.
DE_ARTICLE = {
    ("m", "nom"): "ein",
    ("m", "acc"): "einen",
    ("m", "dat"): "einem",
    ("n", "nom"): "ein",
    ("n", "acc"): "ein",
    ("n", "dat"): "einem",
    ("f", "nom"): "eine",
    ("f", "acc"): "eine",
    ("f", "dat"): "einer",
}
DE_MIXED_ENDING = {
    ("m", "nom"): "er",
    ("m", "acc"): "en",
    ("m", "dat"): "en",
    ("n", "nom"): "es",
    ("n", "acc"): "es",
    ("n", "dat"): "en",
    ("f", "nom"): "e",
    ("f", "acc"): "e",
    ("f", "dat"): "en",
}
# Plural after a bare number word: strong declension.
DE_PLURAL_ENDING = {"nom": "e", "acc": "e", "dat": "en"}
DE_NUMBERS = {2: "zwei", 3: "drei"}

# --- Hindi: nouns (gender, sg direct, pl direct, sg oblique, pl oblique) ------------------------
HI_SHAPES = {
    "circle": ("m", "वृत्त", "वृत्त", "वृत्त", "वृत्तों"),
    "square": ("m", "वर्ग", "वर्ग", "वर्ग", "वर्गों"),
    "triangle": ("m", "त्रिभुज", "त्रिभुज", "त्रिभुज", "त्रिभुजों"),
    "star": ("m", "तारा", "तारे", "तारे", "तारों"),
    "hexagon": ("m", "षट्भुज", "षट्भुज", "षट्भुज", "षट्भुजों"),
    "diamond": ("m", "समचतुर्भुज", "समचतुर्भुज", "समचतुर्भुज", "समचतुर्भुजों"),
    "cross": ("m", "क्रॉस", "क्रॉस", "क्रॉस", "क्रॉसों"),
    "pentagon": ("m", "पंचभुज", "पंचभुज", "पंचभुज", "पंचभुजों"),
    "drop": ("f", "बूँद", "बूँदें", "बूँद", "बूँदों"),
}
# Adjectives ending in -आ inflect (-आ masc sg direct, -ए masc oblique/plural, -ई feminine);
# the others are invariant.
HI_COLOURS = {
    "red": "लाल",
    "green": "हरा",
    "blue": "नीला",
    "yellow": "पीला",
    "orange": "नारंगी",
    "purple": "बैंगनी",
    "black": "काला",
    "white": "सफ़ेद",
}
HI_INFLECTING = {"हरा", "नीला", "पीला", "काला", "बड़ा", "छोटा"}
HI_SIZES = {"small": "छोटा", "big": "बड़ा"}
HI_NUMBERS = {1: "एक", 2: "दो", 3: "तीन"}


def hi_adjective(base: str, gender: str, plural: bool, oblique: bool) -> str:
    if base not in HI_INFLECTING:
        return base
    stem = base[:-1]  # drop the -ा vowel sign
    if gender == "f":
        return stem + "ी"
    return stem + ("े" if plural or oblique else "ा")


def word_forms(lang: str) -> dict[str, dict[str, set[str]]]:
    """Every surface form of every shape, colour and size word, by concept.

    Used to check that a caption names exactly the scene's things, and for vocabularies.
    """
    if lang == "en":
        return {
            "shape": {k: set(v) for k, v in EN_SHAPES.items()},
            "colour": {k: {v} for k, v in EN_COLOURS.items()},
            "size": {k: {v} for k, v in EN_SIZES.items()},
        }
    if lang in ("pt", "es"):
        shapes, colours, sizes = (
            (PT_SHAPES, PT_COLOURS, PT_SIZES) if lang == "pt" else (ES_SHAPES, ES_COLOURS, ES_SIZES)
        )
        return {
            "shape": {k: {v[1], v[2]} for k, v in shapes.items()},
            "colour": {k: set(v) for k, v in colours.items()},
            "size": {k: set(v) for k, v in sizes.items()},
        }
    if lang == "de":
        endings = ("e", "er", "es", "en")
        return {
            "shape": {k: set(v[1:]) for k, v in DE_SHAPES.items()},
            "colour": {k: {v + e for e in endings} for k, v in DE_COLOURS.items()},
            "size": {k: {v + e for e in endings} for k, v in DE_SIZES.items()},
        }
    if lang == "hi":

        def adj(base: str) -> set[str]:
            return {hi_adjective(base, g, p, o) for g in "mf" for p in (0, 1) for o in (0, 1)}

        return {
            "shape": {k: set(v[1:]) for k, v in HI_SHAPES.items()},
            "colour": {k: adj(v) for k, v in HI_COLOURS.items()},
            "size": {k: adj(v) for k, v in HI_SIZES.items()},
        }
    raise ValueError(f"unknown language {lang!r}")


def class_names(lang: str) -> dict[str, dict[str, str]]:
    """Base (singular, masculine or neutral) word for each shape and colour: class labels."""
    if lang == "en":
        return {"shape": {k: v[0] for k, v in EN_SHAPES.items()}, "colour": dict(EN_COLOURS)}
    if lang in ("pt", "es"):
        shapes, colours = (PT_SHAPES, PT_COLOURS) if lang == "pt" else (ES_SHAPES, ES_COLOURS)
        return {
            "shape": {k: v[1] for k, v in shapes.items()},
            "colour": {k: v[0] for k, v in colours.items()},
        }
    if lang == "de":
        return {"shape": {k: v[1] for k, v in DE_SHAPES.items()}, "colour": dict(DE_COLOURS)}
    if lang == "hi":
        return {"shape": {k: v[1] for k, v in HI_SHAPES.items()}, "colour": dict(HI_COLOURS)}
    raise ValueError(f"unknown language {lang!r}")
