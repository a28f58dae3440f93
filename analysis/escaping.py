"""Text from the data (tokens, contexts), the options (labels, titles) and the warehouse (run
ids, paths) written into an HTML page, escaped for where it lands: inside a ``<script>``
block as JSON (here), in a link as a URL path (here), or in HTML text and attributes (the
index page's Jinja template escapes those itself: ``autoescape``).

A raw ``</script>`` in a token's context would close the page's script early, and the rest
of the data would be read as HTML (where an ``<img onerror>`` runs); so would ``<!--``. In
a script's JSON every ``<``, ``>`` and ``&`` is written as its ``\\u`` escape (the same
string to JavaScript), and so are U+2028 and U+2029 (line ends to older JavaScript).
"""

from __future__ import annotations

import json
from urllib.parse import quote

_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                  "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_ESCAPES = str.maketrans(_SCRIPT_UNSAFE)


def script_safe(json_text: str) -> str:
    """JSON text with every ``<``, ``>``, ``&``, U+2028 and U+2029 as its ``\\u`` escape:
    the same value, safe inside an HTML ``<script>`` element. These characters occur only
    inside JSON strings, where the escape means the character itself."""
    return json_text.translate(_SCRIPT_ESCAPES)


def script_json(value: object) -> str:
    """``value`` as JSON to place inside an HTML ``<script>`` element (``script_safe``)."""
    return script_safe(json.dumps(value))


class ScriptJSONEncoder(json.JSONEncoder):
    """A JSON encoder whose output is ``script_safe``: for a library that takes the encoder
    (Altair's ``json_kwds={"cls": ScriptJSONEncoder}``) and places its JSON in a script."""

    def encode(self, o: object) -> str:
        """``o`` as script-safe JSON text."""
        return script_safe(super().encode(o))


def url_path(relative: str) -> str:
    """A relative ``/``-separated path as a URL path (each part percent-encoded: a ``:``
    cannot start a scheme, ``#`` and ``?`` stay part of the name)."""
    return quote(relative, safe="/")
