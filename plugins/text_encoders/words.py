"""The default vocabulary of the ``vocab`` encoder: words of the built-in ``shapes`` captions.

Each word's embedding depends only on (seed, word), so adding words never moves others.
"""

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta", "pink", "brown",
           "white", "black", "gray", "grey")
SHAPES = ("circle", "square", "triangle", "rectangle", "ellipse", "star", "cross", "diamond", "hexagon",
          "ring", "shape", "circles", "squares", "triangles")
SIZES = ("small", "large", "big", "tiny", "medium", "huge")
PLACES = ("left", "right", "top", "bottom", "center", "centre", "middle", "corner", "above", "below", "next")
GLUE = ("a", "an", "the", "on", "in", "at", "of", "with", "and", "to", "background", "image", "picture",
        "photo", "one", "two", "three")

SHAPES_WORDS: tuple[str, ...] = COLOURS + SHAPES + SIZES + PLACES + GLUE
