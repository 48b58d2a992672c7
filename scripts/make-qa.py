#!/usr/bin/env python3
"""Question/answer training data over compressed text, for `giststream train --qa FILE`.

Each line of the output is {"document", "question", "answer"}. The document is a passage
of a book from DIR (a folder of .txt files) with a few made-up facts written into it as
sentences at random depths ("Ilse Varnholt was born in Dunmere."); the question asks for
one of them, and the other facts are distractors about other made-up people, so that an
answer must bind a name to its own fact. The names and places are made of random
syllables, so the model cannot know them: the answer has to come from the document's
stored gists. About a third of the questions instead ask which name is missing from one
of the passage's own sentences (a proper noun the book wrote), so the facts asked for are
not only ours.

    python3 scripts/make-qa.py --books ../shared/corpus/train --count 2000 --seed 1 > qa.jsonl

Held-out questions come from held-out books with another seed. Standard library only.
"""

import argparse
import json
import pathlib
import random
import re
import sys

FIRST = """Anna Bertram Carl Dora Emil Frieda Georg Hanna Ilse Jakob Klara Ludwig Marta
Nikolaus Otto Paula Rudolf Sophie Theodor Ursula Viktor Walter Agnes Bruno Cecilia
Dietrich Elise Franz Greta Heinrich Irene Johann Karoline Leopold Magda Oskar Rosa
Stefan Thekla Albert Bianca Conrad Edith Felix Gisela Hugo Ida Konrad Lotte Moritz
Olga Philipp Regina Simon Tilda Valentin Wilhelmine""".split()
SYL = """var ken dor lin mar bel tos ruk fen gal hor ist wen zel dra mon pel quo sar tiv
bra ulm ost kel nor vid sel tam gor lep han bur rim dus fal ker mol wit ber""".split()
PLACE_END = ["mere", "burg", "ford", "heim", "dal", "stadt", "ton", "wick", "au", "feld"]
JOBS = ["baker", "weaver", "printer", "surgeon", "clockmaker", "ferryman", "tanner",
        "bookbinder", "glassblower", "schoolmaster", "miller", "locksmith", "shipwright",
        "apothecary", "saddler", "cooper"]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "grey", "brown", "purple"]
GARMENTS = ["cloak", "hat", "coat", "scarf", "shawl", "cap"]


def surname(rng):
    return "".join(rng.choice(SYL) for _ in range(rng.choice([2, 2, 3]))).capitalize()


def place(rng):
    return (rng.choice(SYL) + rng.choice(SYL) + rng.choice(PLACE_END)).capitalize()


def person(rng):
    return f"{rng.choice(FIRST)} {surname(rng)}"


def fact(rng):
    """A made-up fact: (sentence written into the text, question, answer, the key)."""
    p = person(rng)
    kind = rng.randrange(8)
    if kind == 0:
        x = place(rng)
        s = rng.choice([f"{p} was born in {x}.", f"It was in {x} that {p} was born.",
                        f"{p}, as the parish books show, was born in {x}."])
        return s, f"Where was {p} born?", f"{p} was born in {x}.", x
    if kind == 1:
        x = rng.choice(JOBS)
        s = rng.choice([f"{p} worked as a {x} for many years.",
                        f"For many years {p} earned a living as a {x}."])
        q = rng.choice([f"What was {p}'s trade?", f"What did {p} work as?"])
        return s, q, f"{p} worked as a {x}.", x
    if kind == 2:
        a, b = place(rng), place(rng)
        s = f"{p} set out from {a} on the road to {b}."
        return s, f"Where was {p} going?", f"{p} was going to {b}.", b
    if kind == 3:
        x = person(rng)
        s = rng.choice([f"{p} swore to kill {x}, who had ruined the family.",
                        f"{p} had sworn to murder {x}."])
        return s, f"Whom did {p} want to kill?", f"{p} wanted to kill {x}.", x
    if kind == 4:
        x, year = person(rng), rng.randrange(1500, 1900)
        s = f"{p} married {x} in {year}."
        if rng.random() < 0.5:
            return s, f"Whom did {p} marry?", f"{p} married {x}.", x
        return s, f"In what year did {p} marry?", f"{p} married in {year}.", str(year)
    if kind == 5:
        n = rng.randrange(10, 10000)
        s = f"The door of {p}'s house bore the number {n}."
        return s, f"What number was on the door of {p}'s house?", f"The number {n}.", str(n)
    if kind == 6:
        c, g = rng.choice(COLORS), rng.choice(GARMENTS)
        s = f"{p} always wore a {c} {g}."
        return s, f"What color was {p}'s {g}?", f"{p}'s {g} was {c}.", c
    x = f"{rng.choice(FIRST)}"
    s = f"{p} had a friend named {x}."
    return s, f"What was the name of {p}'s friend?", f"{p}'s friend was named {x}.", x


SENTENCE_END = re.compile(r"(?<=[.!?])(\s+)(?=[A-Z\"'])")
# A capitalized word inside a sentence (not its first word), not a pronoun or title.
PROPER = re.compile(r"(?<=[a-z,;] )([A-Z][a-z]{3,})(?=[ ,;.])")
NOT_NAMES = {"Then", "There", "This", "That", "They", "When", "What", "With", "From",
             "Their", "These", "Those", "Here", "Chapter", "God", "Lord", "Majesty", "Mister",
             "Madame", "Monsieur", "Sir", "Heaven"}


def passage(rng, text, chars):
    """About `chars` characters of `text` from a random paragraph, cut at sentence ends, as
    a list of (sentence, the whitespace after it). The book's own line wraps and paragraph
    breaks stay: the document is also trained on as text, and an adapter taught text
    without them scored 9% worse on real books (run 19)."""
    starts = [m.end() for m in re.finditer(r"\n\s*\n", text)]
    for _ in range(20):
        s = rng.choice(starts) if starts else 0
        parts = SENTENCE_END.split(text[s:s + chars * 2])
        # sentence, gap, sentence, gap, ...; the last sentence may be cut.
        pairs = list(zip(parts[0::2], parts[1::2]))
        out, n = [], 0
        for x, gap in pairs:
            if n + len(x) > chars and out:
                break
            out.append((x, gap))
            n += len(x) + len(gap)
        if len(out) >= 4:
            return out
    return None


def cloze(rng, sents):
    """A question about a proper noun of one of the passage's sentences, or None."""
    options = []
    sents = [" ".join(x.split()) for x, _ in sents]
    for i, s in enumerate(sents):
        if len(s) > 300:
            continue
        for m in PROPER.finditer(s):
            if m.group(1) not in NOT_NAMES and s.count(m.group(1)) == 1:
                options.append((i, m))
    if not options:
        return None
    i, m = rng.choice(options)
    s = sents[i]
    blanked = s[:m.start(1)] + "___" + s[m.end(1):]
    q = f'Which name is missing from this sentence of the text: "{blanked}"'
    return q, f"The missing name is {m.group(1)}.", m.group(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--books", required=True, help="folder of .txt books")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-chars", type=int, default=800, help="shortest passage")
    ap.add_argument("--max-chars", type=int, default=3000, help="longest passage")
    ap.add_argument("--facts", type=int, default=3, help="made-up facts per passage, at most")
    ap.add_argument("--cloze", type=float, default=0.33, help="share of missing-name questions")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    books = sorted(pathlib.Path(a.books).glob("*.txt"))
    if not books:
        sys.exit(f"{a.books}: no .txt files")
    texts = [b.read_text(encoding="utf-8", errors="replace") for b in books]
    made = 0
    while made < a.count:
        sents = passage(rng, rng.choice(texts), rng.randint(a.min_chars, a.max_chars))
        if sents is None:
            continue
        qa = cloze(rng, sents) if rng.random() < a.cloze else None
        facts = [fact(rng) for _ in range(rng.randint(1 if qa else 2, a.facts))]
        for s, *_ in facts:
            sents.insert(rng.randint(0, len(sents)), (s, " "))
        if qa is None:
            _, q, ans, key = rng.choice(facts)
        else:
            q, ans, key = qa
        document = "".join(x + gap for x, gap in sents).strip()
        print(json.dumps({"document": document, "question": q, "answer": ans, "key": key}))
        made += 1


if __name__ == "__main__":
    main()
