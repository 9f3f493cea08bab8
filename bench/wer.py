"""Word and character error counting for the bench scripts (imported with PYTHONPATH=bench)."""
import re


def edits(a, b):
    """Levenshtein distance between two sequences (words or characters)."""
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        p, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            p, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, p + (x != y))
    return d[-1]


def norm(s):
    """The words of a text as the model writes them: lower case a-z and apostrophe."""
    return re.sub(r"[^a-z' ]", " ", s.lower()).split()
