"""Table sources: CSV, Parquet and JSONL read alike; bad rows are skipped with file, row and offset."""

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from cxrmem.corpus.tables import iter_table_rows, iter_tables, table_files

ID_COLUMNS = ["path", "subject_id", "study"]
ROWS = [
    {"text": "No acute cardiopulmonary process.", "path": "files/p10/a.jpg", "subject_id": 10000032, "study": "s1"},
    {"text": "Compared to ___: small left effusion.", "path": "files/p10/b.jpg", "subject_id": 10000033, "study": "s2"},
    {"text": "No acute cardiopulmonary process.", "path": "files/p11/c.jpg", "subject_id": 11000001, "study": "s3"},
]


def write_all_formats(folder, rows=ROWS):
    table = pa.Table.from_pylist(rows)
    pacsv.write_csv(table, folder / "split.csv")
    pq.write_table(table, folder / "split.parquet")
    (folder / "split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [folder / "split.csv", folder / "split.parquet", folder / "split.jsonl"]


def test_formats_read_the_same_records(tmp_path):
    expected = [
        ("files/p10/a.jpg", "No acute cardiopulmonary process.", {"subject_id": "10000032", "study": "s1"}),
        ("files/p10/b.jpg", "Compared to ___: small left effusion.", {"subject_id": "10000033", "study": "s2"}),
        ("files/p11/c.jpg", "No acute cardiopulmonary process.", {"subject_id": "11000001", "study": "s3"}),
    ]
    for path in write_all_formats(tmp_path):
        records = list(iter_table_rows(str(path), "text", ID_COLUMNS))
        assert [(r.source_id, r.text, r.ids) for r in records] == expected, path.name
        assert all(r.skip is None and r.section is None for r in records)


def test_custom_text_column_and_row_ids_without_id_columns(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("impression,label\nMild cardiomegaly.,1\nSmall effusion.,0\n")
    records = list(iter_table_rows(str(path), "impression", ID_COLUMNS))
    assert [(r.source_id, r.text, r.ids) for r in records] == [
        ("prompts.csv:1", "Mild cardiomegaly.", None),
        ("prompts.csv:2", "Small effusion.", None),
    ]


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_missing_text_column_names_file_and_columns(tmp_path, suffix):
    path = {p.suffix: p for p in write_all_formats(tmp_path)}[f".{suffix}"]
    with pytest.raises(ValueError) as err:
        list(iter_table_rows(str(path), "impression", ID_COLUMNS))
    message = str(err.value)
    assert str(path) in message and "'impression'" in message
    assert "text" in message and "subject_id" in message and "corpus.text_column" in message


def test_bad_rows_are_skipped_with_reason_row_and_offset(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b'text,study\nok,s1\n"caf\xe9 ___",s2\n,s3\n')
    records = list(iter_table_rows(str(csv), "text", ID_COLUMNS))
    assert [(r.source_id, r.text, r.skip) for r in records] == [
        ("s1", "ok", None),
        ("bad.csv:2", None, "invalid_utf8"),
        ("s3", "", None),  # an empty cell is a prompt of no text: prepare counts it as empty
    ]
    assert f"{csv} row 2" in records[1].message and "byte offset 21" in records[1].message

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\nnot json\n{"text": null}\n{"text": 3}\n')
    records = list(iter_table_rows(str(jsonl), "text", ID_COLUMNS))
    assert [(r.source_id, r.skip) for r in records] == [
        ("bad.jsonl:1", None),
        ("bad.jsonl:3", "invalid_utf8"),
        ("bad.jsonl:4", "invalid_row"),
        ("bad.jsonl:5", "empty"),
        ("bad.jsonl:6", "invalid_row"),
    ]
    assert f"{jsonl} line 3" in records[1].message and "byte offset 29" in records[1].message
    assert f"{jsonl} line 4" in records[2].message


def test_unreadable_and_corrupt_files_are_skipped_not_fatal(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    records = list(iter_tables(str(tmp_path), "text", ID_COLUMNS))
    assert [(r.skip, str(tmp_path) in r.message) for r in records] == [("unreadable", True)]  # the folder is not a file
    [corrupt] = list(iter_table_rows(str(tmp_path / "broken.parquet"), "text", ID_COLUMNS))
    assert corrupt.skip == "unreadable" and "broken.parquet" in corrupt.message


def test_folder_of_shards_and_missing_paths(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), shards / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:]), shards / "part-1.parquet")
    (shards / "README.md").write_text("not a table")
    assert [p.rsplit("/", 1)[-1] for p in table_files(str(shards))[0]] == ["part-0.parquet", "part-1.parquet"]
    assert len(list(iter_tables(str(shards), "text", ID_COLUMNS))) == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        table_files(str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError, match="no .csv"):
        table_files(str(tmp_path / "empty_folder"))


def corrupt_data_page(path):
    """Flip bytes in the middle of the first column's data page: the footer stays valid, a page does not."""
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_parquet_with_a_corrupt_page_is_skipped_and_named(tmp_path):
    rows = [{"text": f"Report number {i}, with a few more words."} for i in range(2000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a_bad.parquet", use_dictionary=False, compression="snappy")
    corrupt_data_page(tmp_path / "a_bad.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "b_good.parquet")
    records = list(iter_tables(str(tmp_path), "text", ID_COLUMNS))
    assert [r.skip for r in records] == ["unreadable", None, None, None]
    assert str(tmp_path / "a_bad.parquet") in records[0].message and "replace or remove it" in records[0].message


def test_a_non_text_column_is_an_error_naming_column_and_type(tmp_path):
    pq.write_table(pa.table({"text": [1, 2], "label": ["a", "b"]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints\.parquet: text column 'text' holds int64, not text; set corpus.text_column"):
        list(iter_table_rows(str(tmp_path / "ints.parquet"), "text", ID_COLUMNS))


def test_a_link_outside_the_corpus_folder_is_skipped_and_counted(tmp_path):
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir(), elsewhere.mkdir()
    write_all_formats(elsewhere)
    pq.write_table(pa.Table.from_pylist(ROWS), corpus / "split.parquet")
    (corpus / "other.csv").symlink_to(elsewhere / "split.csv")
    (corpus / "self").symlink_to(corpus, target_is_directory=True)
    files, outside = table_files(str(corpus))
    assert files == [str(corpus / "split.parquet")]
    assert [r.skip for r in outside] == ["outside_root"] and "other.csv" in outside[0].message
    assert [r.skip for r in iter_tables(str(corpus), "text", ID_COLUMNS)] == ["outside_root", None, None, None]
