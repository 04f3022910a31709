"""Context surrogates and the `deid-rewrite` curator tool, on small real tables (local and S3)."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from cxrmem.cli import main
from cxrmem.corpus.deid import rewrite_corpus
from cxrmem.corpus.surrogates import marker_type, replace_with_surrogates
from cxrmem.corpus.text import MARKER_REGEX
from cxrmem.storage import Store

PATTERN = re.compile(MARKER_REGEX)

ROWS = [
    # (id with a leading zero, text): the markers below are 2 date, 2 time, 3 name, 1 age, 1 generic
    ("001", "Compared to ___, the heart is enlarged."),
    ("002", "Dr. ___ was notified of the findings by telephone at ___ a.m. on ___."),
    ("003", "No acute cardiopulmonary process."),
    ("004", "___-year-old man. Findings were discussed with Dr. ___ at ___ p.m."),
    ("005", "The ___ tube is in place. Also seen by ___."),
]
EXPECTED = {"date": 2, "time": 2, "name": 3, "age": 1, "generic": 1}


def marker_kinds(text: str) -> list[str]:
    return [marker_type(text, m.start(), m.end()) for m in PATTERN.finditer(text)]


def test_marker_types_follow_context():
    assert marker_kinds("Compared to ___, the heart is enlarged.") == ["date"]
    assert marker_kinds("In comparison with the study of ___: stable.") == ["date"]
    assert marker_kinds("Dr. ___ was notified at ___ a.m. on ___.") == ["name", "time", "date"]
    kinds = marker_kinds("communicated to Dr. ___ by Dr. ___ at ___ on ___ by telephone")
    assert kinds == ["name", "name", "time", "date"]
    assert marker_kinds("___-year-old female with cough") == ["age"]
    assert marker_kinds("The ___ tube is in place. XXXX XXXX.") == ["generic", "generic", "generic"]


def test_surrogates_are_realistic_varied_and_seeded():
    text = "Dr. ___ was notified at ___ a.m. on ___. A ___-year-old."
    rewritten, counts = replace_with_surrogates(text, PATTERN, np.random.default_rng(0))
    match = re.fullmatch(
        r"Dr\. ([A-Z][a-z]+) was notified at (\d{1,2}:\d{2}) a\.m\. on (.+)\. A (\d+)-year-old\.", rewritten
    )
    assert match, rewritten
    assert re.search(r"\d", match.group(3))  # a date
    assert 18 <= int(match.group(4)) <= 95
    assert counts == {"name": 1, "time": 1, "date": 1, "age": 1}
    assert replace_with_surrogates(text, PATTERN, np.random.default_rng(0))[0] == rewritten
    variants = {replace_with_surrogates(text, PATTERN, np.random.default_rng(s))[0] for s in range(20)}
    assert len(variants) == 20


def write_rows(path, fmt):
    frame = pd.DataFrame(ROWS, columns=["id", "text"])
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_rewrite_counts_by_type_and_keeps_everything_else(tmp_path, suffix):
    source, target = tmp_path / f"in.{suffix}", tmp_path / f"out.{suffix}"
    write_rows(source, suffix)
    report = rewrite_corpus(str(source), str(target))
    assert report["by_type"] == EXPECTED
    assert report["markers_replaced"] == sum(EXPECTED.values())
    assert report["rows"] == 5 and report["rows_touched"] == 4
    if suffix == "csv":
        out = pd.read_csv(target, dtype=str)
    elif suffix == "parquet":
        out = pd.read_parquet(target)
    else:
        out = pd.read_json(target, lines=True, dtype=False)
    assert out["id"].tolist() == ["001", "002", "003", "004", "005"]  # ids are not retyped
    assert not out["text"].str.contains(MARKER_REGEX).any()
    assert out["text"][2] == ROWS[2][1]
    for (_, before), after in zip(ROWS, out["text"]):
        outside = PATTERN.split(before)  # the text between markers survives verbatim, in order
        assert re.fullmatch(".+?".join(re.escape(p) for p in outside), after), after
    # Deterministic given the seed; another seed gives other surrogates.
    again = tmp_path / f"again.{suffix}"
    rewrite_corpus(str(source), str(again))
    assert again.read_bytes() == target.read_bytes()
    other = tmp_path / f"other.{suffix}"
    rewrite_corpus(str(source), str(other), seed=7)
    assert other.read_bytes() != target.read_bytes()


def test_duplicate_reports_get_different_surrogates(tmp_path):
    source = tmp_path / "dup.csv"
    pd.DataFrame({"text": ["Compared to ___, no change."] * 5}).to_csv(source, index=False)
    rewrite_corpus(str(source), str(tmp_path / "out.csv"))
    assert pd.read_csv(tmp_path / "out.csv")["text"].nunique() > 1


def test_missing_column_names_the_file_and_the_columns(tmp_path):
    source = tmp_path / "reports.csv"
    write_rows(source, "csv")
    with pytest.raises(ValueError, match=r"reports\.csv.*'report'.*\['id', 'text'\]"):
        rewrite_corpus(str(source), str(tmp_path / "out.csv"), text_column="report")


def test_cli_deid_rewrite(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    write_rows(source, "jsonl")
    code = main(["deid-rewrite", "--input", str(source), "--output", str(tmp_path / "out.csv")])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["by_type"] == EXPECTED
    wrong_column = ["--text-column", "report"]
    assert main(["deid-rewrite", "--input", str(source), "--output", str(tmp_path / "o.csv"), *wrong_column]) == 1


def test_rewrite_on_s3(s3_bucket, tmp_path):
    local = tmp_path / "in.parquet"
    write_rows(local, "parquet")
    source, target = f"s3://{s3_bucket}/corpus/in.parquet", f"s3://{s3_bucket}/corpus/out.parquet"
    Store().write_bytes(source, local.read_bytes())
    report = rewrite_corpus(source, target)
    assert report["by_type"] == EXPECTED
    assert Store().read_table(target).num_rows == 5
