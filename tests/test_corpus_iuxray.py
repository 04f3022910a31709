"""IU X-ray reports read from the torchxrayvision package's own data file (never imported)."""

import os
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from cxrmem.config import load_config
from cxrmem.corpus.iuxray import find_reports_file, iter_iuxray_reports
from cxrmem.corpus.text import count_markers, normalise_whitespace
from cxrmem.stages import prepare

ORDER = ["IMPRESSION", "FINDINGS", "LAST_PARAGRAPH"]


@pytest.fixture(scope="module")
def iu_records():
    return list(iter_iuxray_reports(None, ORDER))


def test_reports_file_is_found_without_importing_the_package():
    path = find_reports_file()
    assert os.path.isfile(path) and path.endswith("NLMCXR_reports.tgz")
    assert "torchxrayvision" not in sys.modules


def test_thousands_of_reports_with_xxxx_markers(iu_records):
    assert len(iu_records) > 3000
    sections = Counter(r.section for r in iu_records if r.skip is None)
    assert sections["IMPRESSION"] > 0.95 * sum(sections.values())
    assert sections["FINDINGS"] > 0  # reports without an impression fall back
    prompts = {normalise_whitespace(r.text) for r in iu_records if r.skip is None}
    marked = [p for p in prompts if count_markers(p) > 0]
    assert len(marked) > 0.1 * len(prompts)
    assert all("XXXX" in p for p in marked)
    assert len({r.source_id for r in iu_records}) == len(iu_records)
    assert all(r.source_id.startswith("CXR") for r in iu_records)


def test_empty_reports_are_counted_with_their_file(iu_records):
    empty = [r for r in iu_records if r.skip is not None]
    assert empty and all(r.skip == "no_section" and "NLMCXR_reports.tgz!ecgen-radiology/" in r.message for r in empty)


def test_prepare_on_iuxray(tiny_model_dir, tmp_path, iu_records):
    cfg = load_config(None, ["corpus.source=iuxray", f"model.path={tiny_model_dir}", f"run.output={tmp_path}"])
    summary = prepare.run(cfg)
    table = pq.read_table(tmp_path / "prompts.parquet")
    assert summary.reports_read == len(iu_records)
    assert summary.prompts_unique == table.num_rows
    assert summary.reports_with_prompt + summary.skipped_total == summary.reports_read
    assert summary.top_duplicated[0]["prompt"] == "No acute cardiopulmonary abnormality."
    assert summary.top_duplicated[0]["n_reports"] > 100
    assert 0.1 < summary.marker_share_unique < 0.9


def test_a_corrupt_archive_is_an_error_naming_the_file(tmp_path):
    data = bytearray(open(find_reports_file(), "rb").read())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # tarfile alone reads half the reports, silently
    broken = tmp_path / "NLMCXR_reports.tgz"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"NLMCXR_reports\.tgz: not a readable \.tgz archive"):
        list(iter_iuxray_reports(str(broken), ORDER))
