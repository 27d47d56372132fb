"""The A1111 prompt-weighting ("attention" / "emphasis") syntax: ``parse_prompt_attention(text)``.

Semantics of AUTOMATIC1111 stable-diffusion-webui ``modules/prompt_parser.py``:

- ``(abc)`` multiplies the weight of ``abc`` by 1.1, ``[abc]`` by 1/1.1, ``(abc:1.3)`` by 1.3;
  nested brackets multiply (``((abc))`` = 1.1² = 1.21); an unclosed bracket applies to the end.
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; a lone ``\\`` is dropped;
  a ``)`` or ``]`` with no open bracket is literal text.
- ``BREAK`` (upper case, a word on its own) ends the current 75-token chunk: it parses to :data:`BREAK`.
  Unlike A1111 (where a BREAK inside brackets gets a weight and turns into the word "break"), it
  is a chunk boundary wherever it stands.
- Runs of equal weight are merged; an empty prompt is ``[("", 1.0)]``.

The weights are float products in A1111's order, so they equal A1111's bit for bit (e.g.
``(((house:1.3)))`` gives ``1.3 * 1.1 * 1.1 = 1.5730000000000004``).
"""

from __future__ import annotations

import re

ROUND_MULTIPLIER = 1.1  # (abc)
SQUARE_MULTIPLIER = 1 / 1.1  # [abc]
BREAK = ("BREAK", -1.0)  # A1111's marker for the BREAK keyword: start a new chunk

_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|     # escapes, and a lone backslash
    \(|\[|                          # openers
    :\s*([+-]?[.\d]+)\s*\)|         # ":1.3)" closes a round bracket with an explicit weight
    \)|]|                           # closers
    [^\\()\[\]:]+|                  # plain text
    :                               # a colon that is not a weight
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``"a (red:1.5) [dog]"`` -> ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("dog", 1/1.1)]``.

    Each ``(text, weight)`` pair is a run of the prompt with its weight; :data:`BREAK` marks a
    forced chunk boundary. Raises ``ValueError`` on a weight that is not a number (``(a:1.2.3)``).
    """
    res: list[list] = []  # [text, weight, is_break] entries, weights mutated as brackets close
    round_brackets: list[int] = []  # positions in res where an open "(" starts
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for entry in res[start:]:
            if not entry[2]:
                entry[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0, False])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _weight(weight, text))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append([*BREAK, True])
                res.append([part, 1.0, False])

    for start in round_brackets:  # unclosed brackets reach to the end
        multiply_range(start, ROUND_MULTIPLIER)
    for start in square_brackets:
        multiply_range(start, SQUARE_MULTIPLIER)

    if not res:
        res = [["", 1.0, False]]
    merged = [res[0]]
    for entry in res[1:]:  # merge runs of identical weights (never a BREAK)
        if entry[1] == merged[-1][1] and not entry[2] and not merged[-1][2]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    return [(str(t), float(w)) for t, w, _ in merged]


def has_weighting(text: str) -> bool:
    """Whether ``text`` uses any of the syntax (brackets, escapes, BREAK): if not, it parses to itself."""
    return parse_prompt_attention(text) != [(text, 1.0)]


def _weight(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        shown = text if len(text) <= 100 else text[:100] + "…"
        raise ValueError(f"prompt {shown!r}: weight {value!r} is not a number; allowed: (word:1.3)") from None
