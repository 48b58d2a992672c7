#!/usr/bin/env python3
"""The import graph between the top-level modules of src/ (test modules left out).

Prints each module's `crate::` imports, the edges that point against the order of
src/lib.rs's module list in its doc comment, and any loop; exits non-zero on a loop, on
an import of `cli` from library code, or on an import against the order.
"""
import os, re, sys

ORDER = ["text", "model", "engine", "store", "query", "service", "ingest", "jobs",
         "serve", "train", "bench", "cli"]


def strip_tests(text):
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < pos:
            continue
        out.append(text[pos:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        pos = j
    out.append(text[pos:])
    return "\n".join(l for l in "".join(out).splitlines() if not l.lstrip().startswith("//"))


edges = {}
for root, _, names in os.walk("src"):
    for n in names:
        if not n.endswith(".rs"):
            continue
        f = os.path.join(root, n)
        rel = os.path.relpath(f, "src").split(os.sep)
        top = rel[0][:-3] if len(rel) == 1 else rel[0]
        if top in ("main", "lib"):
            continue
        text = strip_tests(open(f, encoding="utf-8").read())
        for m in re.finditer(r"crate::([a-z_][a-z0-9_]*)", text):
            if m.group(1) != top:
                edges.setdefault(top, set()).add(m.group(1))
        for m in re.finditer(r"use crate::\{([^}]*)\}", text):
            for part in re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", m.group(1)):
                if part != top:
                    edges.setdefault(top, set()).add(part)

bad = []
for a in ORDER:
    deps = sorted(edges.get(a, ()), key=lambda d: ORDER.index(d) if d in ORDER else 99)
    print(f"{a:8} -> {', '.join(deps) if deps else '(nothing)'}")
    for d in deps:
        if d not in ORDER:
            bad.append(f"{a} imports {d}, which is not in the order")
        elif ORDER.index(d) > ORDER.index(a):
            bad.append(f"{a} imports {d}, which comes after it")
missing = set(edges) - set(ORDER)
for m in sorted(missing):
    bad.append(f"module {m} is not in the order")
for b in bad:
    print("against the order:", b)
sys.exit(1 if bad else 0)
