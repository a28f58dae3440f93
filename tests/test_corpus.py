"""Local text corpora and document packing."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.errors import UserError
from etl.sources.local_files import expand_data_files, load_local_texts
from etl.sources.packing import pack_documents


@pytest.fixture()
def corpus_dir(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\nIt has two lines.\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i})
                                                for i, t in enumerate(["Row one.", "Row two."])))
    pq.write_table(pa.table({"text": ["Parquet row."]}), tmp_path / "c.parquet")
    return tmp_path


def test_local_files_of_every_kind_are_read(corpus_dir):
    texts = load_local_texts(str(corpus_dir / "*"))
    assert sorted(texts) == sorted(["First document.\nIt has two lines.\n", "Row one.",
                                    "Row two.", "Parquet row."])


def test_unmatched_empty_and_unsupported_files_are_errors(tmp_path):
    with pytest.raises(UserError, match="matched no file"):
        load_local_texts(str(tmp_path / "*.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no text"):
        load_local_texts(str(tmp_path / "*.txt"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported"):
        expand_data_files(str(tmp_path / "*.csv"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "no_text.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        load_local_texts(str(tmp_path / "no_text.parquet"))


def test_packing_prepends_bos_joins_with_eos_and_is_seeded(tokenizer):
    docs = [f"Document number {i} says hello to the world." for i in range(20)]
    packed = pack_documents(docs, tokenizer, n_seqs=4, seq_len=16, seed=1, source={})
    assert packed.token_ids.shape == (4, 16)
    assert np.all(packed.token_ids[:, 0] == tokenizer.bos_token_id)
    assert not packed.is_pad.any()
    body = packed.token_ids[:, 1:].reshape(-1).tolist()
    assert tokenizer.eos_token_id in body  # documents are separated by EOS
    again = pack_documents(docs, tokenizer, n_seqs=4, seq_len=16, seed=1, source={})
    other = pack_documents(docs, tokenizer, n_seqs=4, seq_len=16, seed=2, source={})
    assert np.array_equal(packed.token_ids, again.token_ids)
    assert not np.array_equal(packed.token_ids, other.token_ids)
    assert packed.fingerprint() == again.fingerprint() != other.fingerprint()


def test_packing_uses_what_there_is_and_refuses_too_little(tokenizer):
    docs = ["one two three four five six seven eight nine ten"]
    packed = pack_documents(docs, tokenizer, n_seqs=10, seq_len=5, seed=0, source={})
    assert packed.n_seqs == 2 and packed.source["sequences_requested"] == 10
    with pytest.raises(UserError, match="fewer than --seq-len"):
        pack_documents(docs, tokenizer, n_seqs=1, seq_len=100, seed=0, source={})


def test_openwebtext_reads_the_parquet_conversion(monkeypatch, tokenizer):
    import datasets

    from etl.sources import corpus

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict({"text": [f"Web page {i} text." for i in range(50)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts = corpus.load_openwebtext()
    assert calls == [("stas/openwebtext-10k",
                      {"revision": "refs/convert/parquet", "split": "train"})]
    packed = pack_documents(texts, tokenizer, n_seqs=3, seq_len=10, seed=420, source={})
    assert packed.token_ids.shape == (3, 10)


def test_openwebtext_offline_is_one_clear_error():
    from etl.sources.corpus import load_openwebtext

    with pytest.raises(UserError, match="not available offline.*--data-files"):
        load_openwebtext()
