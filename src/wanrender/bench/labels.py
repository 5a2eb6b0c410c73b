"""Chart labels that fit their space and still tell the cases apart.

A report's series and bars are named by what varies between cases; such names can
be long and alike except in one spot. The visible text is shortened around the
part that differs (the element's <title> keeps the whole name) and wrapped onto a
few lines.
"""

from __future__ import annotations

ELLIPSIS = "…"


def fit_lines(names: list[str], width: int, max_lines: int) -> list[list[str]]:
    """Each name as at most ``max_lines`` lines of at most ``width`` characters, all told apart."""
    limit = width * max_lines
    while True:
        wrapped = [wrap(s, width) for s in fit_labels(names, limit)]
        # Wrapping at spaces leaves lines short: shorten a little more until they fit.
        if all(len(w) <= max_lines for w in wrapped) or limit <= width:
            return wrapped
        limit = max(width, limit - max(1, width // 4))


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, broken at spaces (inside a word too long for a line)."""
    lines: list[str] = []
    cur = ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = ""
        if cur:
            cur = f"{cur} {word}"
            continue
        while len(word) > width:
            lines.append(word[:width])
            word = word[width:]
        cur = word
    lines.append(cur)
    return lines


def fit_labels(names: list[str], limit: int) -> list[str]:
    """Visible texts of at most ``limit`` characters that still tell the names apart.

    A name that fits is kept. A long one loses what the long names share (their common
    start and end, at word boundaries) and then, if need be, its middle; names still
    alike after that show the stretch where they differ, and a number as the last resort.
    """
    out = [n if len(n) <= limit else _shorten(n, names, limit) for n in names]
    for text in set(out):
        idx = [i for i, t in enumerate(out) if t == text]
        if len({names[i] for i in idx}) > 1:
            for i in idx:
                out[i] = _around_difference(names[i], [names[j] for j in idx if names[j] != names[i]], limit)
    first: dict[str, str] = {}
    for i, text in enumerate(out):
        if first.setdefault(text, names[i]) != names[i]:
            tag = f" #{i + 1}"
            out[i] = text[: limit - len(tag)] + tag
    return out


def _shorten(name: str, names: list[str], limit: int) -> str:
    long = sorted({n for n in names if len(n) > limit})  # the names that fit are shown whole
    start, end = 0, len(name)
    if len(long) > 1:
        common = _common_prefix(long)
        start = common.rfind(" ") + 1 or len(common)  # whole words where there are words
        common = _common_prefix([n[start:][::-1] for n in long])
        end = len(name) - (common.rfind(" ") + 1 or len(common))

    def shown(a: int, b: int) -> str:
        return (ELLIPSIS if a else "") + name[a:b] + (ELLIPSIS if b < len(name) else "")

    # Give back shared words while they fit: the words before the difference, then after it.
    while start > 0 and len(shown(_word_before(name, start), end)) <= limit:
        start = _word_before(name, start)
    while end < len(name) and len(shown(start, _word_after(name, end))) <= limit:
        end = _word_after(name, end)
    if " " not in name:  # no words to give back: characters, on both sides where there are any
        room = limit - len(shown(start, end))
        after = min(len(name) - end, room // 2)
        before = min(start, room - after)
        after = min(len(name) - end, room - before)
        start, end = start - before, end + after
    text = shown(start, end)
    if len(text) <= limit:
        return text
    core = name[start:end]
    pre, post = (ELLIPSIS if start else ""), (ELLIPSIS if end < len(name) else "")
    room = max(2, limit - len(pre) - len(post) - 1)
    return pre + core[: (room + 1) // 2] + ELLIPSIS + core[len(core) - room // 2 :] + post


def _word_before(text: str, i: int) -> int:
    j = text.rfind(" ", 0, max(0, i - 1))
    return j + 1 if j >= 0 else 0


def _word_after(text: str, i: int) -> int:
    j = text.find(" ", i + 1)
    return j if j >= 0 else len(text)


def _around_difference(name: str, others: list[str], limit: int) -> str:
    """The stretch of ``name`` from just before it parts from the nearest other name."""
    at = max(len(_common_prefix([name, o])) for o in others)
    start = max(0, min(at - limit // 3, len(name) - limit + 1))
    text = (ELLIPSIS if start else "") + name[start : start + limit - (1 if start else 0)]
    if start + len(text) - (1 if start else 0) < len(name):
        text = text[: limit - 1] + ELLIPSIS
    return text


def _common_prefix(texts: list[str]) -> str:
    lo, hi = min(texts), max(texts)  # the sorted extremes share what all of them share
    n = 0
    while n < min(len(lo), len(hi)) and lo[n] == hi[n]:
        n += 1
    return lo[:n]
