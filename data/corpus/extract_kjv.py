#!/usr/bin/env python3
"""Rebuilds data/corpus/kjv_*.txt from Debian's bible-kjv package (how the shipped files were made).

    apt-get install bible-kjv            # brings bible-kjv-text (the compressed text) and `bible`
    bible -l100000 "gen1:1-rev22:21" > /tmp/kjv_all.txt
    python3 data/corpus/extract_kjv.py /tmp/kjv_all.txt data/corpus

One file per book (one document per file for dmc-prep); a book is its chapters, each a heading
"<Book> <chapter>", a blank line, then one verse per line as "<verse> <text>".
"""
import re
import sys

# 11 Old Testament books and the whole New Testament: 38 books, about 1.9 MB.
OLD_TESTAMENT = ["Genesis", "Exodus", "Ruth", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes",
                 "Song of Solomon", "Jonah", "Daniel"]


def main(src, dst):
    books, order, cur = {}, [], None
    for line in open(src, encoding="utf-8"):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            books[cur].append(f"{m.group(1)} {m.group(2).strip()}")
            continue
        m = re.match(r"^(.*\S) (\d+)$", line)
        assert m, line
        name, chapter = m.group(1), m.group(2)
        if name not in books:
            books[name] = []
            order.append(name)
        if books[name]:
            books[name].append("")
        books[name] += [f"{name} {chapter}", ""]
        cur = name
    selected = OLD_TESTAMENT + order[order.index("Matthew"):]
    total = 0
    for name in selected:
        number = order.index(name) + 1
        path = "%s/kjv_%02d_%s.txt" % (dst, number, re.sub(r"[^a-z0-9]+", "_", name.lower()))
        text = "\n".join(books[name]) + "\n"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        total += len(text.encode())
    print(f"{len(selected)} books, {total} bytes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
