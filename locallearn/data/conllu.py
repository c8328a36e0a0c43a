"""A CoNLL-U reader for word-level labels (Universal Dependencies treebanks such as UD English EWT).

Only syntactic words count: multiword-token lines (``3-4``) and empty nodes (``5.1``) are skipped,
though a multiword token's surface form is used to place its words in the sentence text. Each word
is located in the sentence's ``# text =`` line, so that a character model's representation of the
word can be read at the word's last character.
"""

from dataclasses import dataclass, field
from pathlib import Path

from locallearn.errors import ConfigError

# The 17 universal POS tags, in the order of the UD documentation.
UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X")


@dataclass
class Sentence:
    """One sentence: its raw text and, per syntactic word, the form, labels and last-character index."""

    text: str
    forms: list[str] = field(default_factory=list)
    upos: list[str] = field(default_factory=list)
    deprel: list[str] = field(default_factory=list)  # coarse: the part before ':' ("nmod:poss" -> "nmod")
    ends: list[int] = field(default_factory=list)  # index in ``text`` of each word's last character
    starts: list[int] = field(default_factory=list)  # index in ``text`` of each word's first character


def read_conllu(path) -> list[Sentence]:
    """Read every sentence of a CoNLL-U file; a malformed line raises a :class:`ConfigError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass the path of a CoNLL-U file.")
    sentences, block, start = [], [], 1
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.strip():
                if not block:
                    start = n
                block.append(line)
            elif block:
                sentences.append(_sentence(block, path, start))
                block = []
    if block:
        sentences.append(_sentence(block, path, start))
    return sentences


def _sentence(lines: list[str], path: Path, first: int) -> Sentence:
    def bad(i: int, problem: str):
        return ConfigError(f"{path}, line {first + i}: {problem}; fix or remove that line.")

    text, rows = None, []
    for i, line in enumerate(lines):
        if line.startswith("#"):
            if line.startswith("# text = "):
                text = line[len("# text = "):]
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise bad(i, f"expected 10 tab-separated columns, found {len(cols)}")
        rows.append((i, cols))
    if text is None:  # rebuild the text from the forms and their SpaceAfter=No marks
        text = "".join(c[1] + ("" if "SpaceAfter=No" in c[9] else " ") for _, c in rows
                       if "." not in c[0] and not _in_range(c[0], rows)).rstrip()
    sent = Sentence(text)
    pos, token, token_start = 0, None, 0  # token: (last word id, end index) of the multiword token being read, if any
    for i, cols in rows:
        wid, form = cols[0], cols[1]
        if "." in wid:
            continue  # an empty node: no surface form
        if "-" in wid:
            lo, _, hi = wid.partition("-")
            at = _find(text, form, pos)
            if not (lo.isdigit() and hi.isdigit()):
                raise bad(i, f"malformed multiword-token id {wid!r}")
            if at < 0:
                raise bad(i, f"multiword token {form!r} not found in the sentence text after character {pos}")
            pos, token, token_start = at, (int(hi), at + len(form)), at
            continue
        if not wid.isdigit():
            raise bad(i, f"malformed word id {wid!r}")
        if cols[3] not in UPOS:
            raise bad(i, f"unknown UPOS tag {cols[3]!r} (expected one of the 17 universal tags)")
        if token is not None:
            # A word inside a multiword token ("do" of "don't"): found within the surface form if it is
            # spelled there, else represented at the token's last character ("wo" of "won't" is).
            last, token_end = token
            at = _find(text[:token_end], form, pos)
            begin = at if at >= 0 else token_start
            end = at + len(form) - 1 if at >= 0 else token_end - 1
            pos = end + 1 if at >= 0 else pos
            if int(wid) >= last:
                end, pos, token = token_end - 1, token_end, None
        else:
            at = _find(text, form, pos)
            if at < 0:
                raise bad(i, f"word {form!r} not found in the sentence text after character {pos}")
            begin, end, pos = at, at + len(form) - 1, at + len(form)
        sent.forms.append(form)
        sent.upos.append(cols[3])
        sent.deprel.append(cols[7].split(":")[0])
        sent.ends.append(end)
        sent.starts.append(min(begin, end))
    return sent


def _find(text: str, form: str, pos: int) -> int:
    """Index of ``form`` in ``text`` at ``pos`` after optional whitespace, else -1 (words are contiguous)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos if text.startswith(form, pos) else -1


def _in_range(wid: str, rows) -> bool:
    """Whether word ``wid`` lies inside a multiword token of ``rows`` (its form is the token's)."""
    if "-" in wid or not wid.isdigit():
        return False
    for _, c in rows:
        if "-" in c[0]:
            lo, _, hi = c[0].partition("-")
            if lo.isdigit() and hi.isdigit() and int(lo) <= int(wid) <= int(hi):
                return True
    return False
