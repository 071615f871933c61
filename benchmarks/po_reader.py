"""babel's read_po vs the demo corpus's parse_po on the Django catalogs: the same pairs? how fast?

    python benchmarks/po_reader.py
"""

from __future__ import annotations

import logging
import time

from babel.messages.pofile import read_po

from moe_routing.corpora import DEFAULT_LANGS
from moe_routing.corpora.catalogs import DJANGO_LOCALES, _catalog_files, catalog_pairs, parse_po

logging.getLogger("babel").setLevel(logging.ERROR)  # babel logs every plural form it drops


def babel_entries(path):
    """babel's catalog as parse_po's entries (id, plural, strs, fuzzy, ctx) and its plural expression."""
    with open(path, "rb") as fh:
        cat = read_po(fh)
    entries = []
    for m in cat:
        if not m.id:
            continue
        e = {"fuzzy": m.fuzzy}
        if isinstance(m.id, tuple):
            e["id"], e["plural"], e["strs"] = m.id[0], m.id[1], dict(enumerate(m.string))
        else:
            e["id"], e["strs"] = m.id, {0: m.string or ""}
        if m.context:
            e["ctx"] = m.context
        entries.append(e)
    return entries, cat.plural_expr


def main() -> None:
    same = diff = 0
    t_hand = t_babel = 0.0
    examples = []
    for lang in DEFAULT_LANGS:
        for path in _catalog_files(DJANGO_LOCALES.get(lang, lang)):
            t = time.perf_counter()
            a, expr = parse_po(path)
            t_hand += time.perf_counter() - t
            t = time.perf_counter()
            b, bexpr = babel_entries(path)
            t_babel += time.perf_counter() - t
            pa, pb = catalog_pairs(a, expr), catalog_pairs(b, bexpr)
            if pa == pb:
                same += 1
                continue
            diff += 1
            lost = sorted(k for k in pa if pa.get(k) != pb.get(k))
            examples.append(f"{path.parent.parent.name}/{path.name}: {len(lost)} pairs differ, e.g. {lost[0]!r}")
    print(f"catalog files with identical pairs: {same}, different: {diff}")
    print(f"parse time over all files: parse_po {t_hand:.2f} s, babel read_po {t_babel:.2f} s")
    print("\n".join(examples))


if __name__ == "__main__":
    main()
