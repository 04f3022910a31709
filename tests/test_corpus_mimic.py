"""MIMIC-CXR report sections: header variants, typos, addenda, fallbacks, and the folder reader."""

import pytest

from cxrmem.corpus.mimic import extract_prompt, header_kind, iter_mimic_reports, read_files, report_ids
from cxrmem.corpus.text import normalise_whitespace

ORDER = ["IMPRESSION", "FINDINGS", "LAST_PARAGRAPH"]

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___-year-old woman with cough  // eval for pneumonia

 COMPARISON:  ___

 FINDINGS:

 Heart size is normal. Small left pleural effusion.

 {header}

 Small left pleural effusion,
 new since ___.
"""


def prompt_of(text, order=ORDER):
    section, prompt = extract_prompt(text, order)
    return section, normalise_whitespace(prompt)


@pytest.mark.parametrize(
    "header",
    ["IMPRESSION:", "IMPRESSIONS:", "Impression :", "impression:", "IMPRESSION :", "IMPRESSlON:", "IMPRESION:", "CONCLUSION:"],
)
def test_impression_header_variants_and_typos(header):
    assert prompt_of(REPORT.format(header=header)) == ("IMPRESSION", "Small left pleural effusion, new since ___.")


def test_header_on_the_same_line_as_text():
    text = "FINDINGS: Lungs are clear.  IMPRESSION: No acute cardiopulmonary process."
    assert prompt_of(text) == ("IMPRESSION", "No acute cardiopulmonary process.")
    assert prompt_of("Lungs clear IMPRESSION: Normal chest.") == ("IMPRESSION", "Normal chest.")


def test_colons_inside_the_text_are_not_headers():
    text = (
        "FINDINGS: PA and lateral views of the chest: the lungs are clear.\n"
        "IMPRESSION:\n AP chest compared to ___:  Previous mild pulmonary edema has resolved.\n"
        " 1. Right lower lobe: no consolidation. The impression: stable.\n"
    )
    assert prompt_of(text) == (
        "IMPRESSION",
        "AP chest compared to ___: Previous mild pulmonary edema has resolved. "
        "1. Right lower lobe: no consolidation. The impression: stable.",
    )
    assert prompt_of("FINDINGS: PA and lateral views of the chest: clear lungs.") == (
        "FINDINGS",
        "PA and lateral views of the chest: clear lungs.",
    )


def test_header_kind_tolerance_is_bounded():
    assert header_kind("IMPRESSlON") == "IMPRESSION"
    assert header_kind("Findngs") == "FINDINGS"
    assert header_kind("Clinical  history") == "CLINICAL HISTORY"
    assert header_kind("PA and lateral views of the chest") is None
    assert header_kind("Heart") is None
    assert header_kind("AP chest compared to ___") is None


def test_fallback_to_findings_then_last_paragraph():
    empty_impression = "FINDINGS:\n Mild cardiomegaly.\n\nIMPRESSION:\n\nNOTIFICATION: Dr. ___ was notified."
    assert prompt_of(empty_impression) == ("FINDINGS", "Mild cardiomegaly.")
    no_headers = "Portable chest.\n\nLines and tubes unchanged.\n Mild edema.\n \n"
    assert prompt_of(no_headers) == ("LAST_PARAGRAPH", "Lines and tubes unchanged. Mild edema.")
    assert prompt_of("INDICATION: fever\n\nSmall right effusion.") == ("LAST_PARAGRAPH", "Small right effusion.")
    assert extract_prompt("   \n ", ORDER) == (None, "")


def test_section_order_is_configurable():
    text = REPORT.format(header="IMPRESSION:")
    assert prompt_of(text, ["FINDINGS", "IMPRESSION"]) == ("FINDINGS", "Heart size is normal. Small left pleural effusion.")
    assert extract_prompt("FINDINGS: x", ["IMPRESSION"]) == (None, "")


def test_addenda_are_not_the_prompt():
    addendum_first = (
        "ADDENDUM: The study was reviewed again. IMPRESSION: revised wording.\n\n"
        "FINAL REPORT\nEXAMINATION: CHEST\nIMPRESSION: Original impression.\n"
    )
    assert prompt_of(addendum_first) == ("IMPRESSION", "Original impression.")
    addendum_last = "FINAL REPORT\nFINDINGS: Clear.\nIMPRESSION: Normal.\n\nADDENDUM\nIMPRESSION: Dr. ___ called.\n"
    assert prompt_of(addendum_last) == ("IMPRESSION", "Normal.")
    only_findings_then_addendum = "FINDINGS: Small nodule.\n\n Addendum:\n Recommend CT.\n"
    assert prompt_of(only_findings_then_addendum) == ("FINDINGS", "Small nodule.")


def test_report_ids_from_path():
    assert report_ids("s3://b/mimic/files/p10/p10000032/s50414267.txt") == (
        "p10/p10000032/s50414267",
        {"subject_id": "p10000032", "study": "s50414267"},
    )
    assert report_ids("/data/other/report.txt")[0] == "/data/other/report.txt"


def test_folder_reader_counts_bad_files(tmp_path):
    files = tmp_path / "files"
    good = files / "p10" / "p10000032" / "s50414267.txt"
    good.parent.mkdir(parents=True)
    good.write_text(REPORT.format(header="IMPRESSION:"))
    bad = files / "p11" / "p11000011" / "s51000011.txt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"IMPRESSION: caf\xe9 ___\n")  # Latin-1, not UTF-8
    blank = files / "p11" / "p11000011" / "s51000012.txt"
    blank.write_text("  \n\n ")

    records = list(iter_mimic_reports(str(tmp_path), ORDER))
    by_id = {r.source_id: r for r in records}
    assert set(by_id) == {"p10/p10000032/s50414267", "p11/p11000011/s51000011", "p11/p11000011/s51000012"}
    ok = by_id["p10/p10000032/s50414267"]
    assert (ok.section, ok.skip, ok.ids) == ("IMPRESSION", None, {"subject_id": "p10000032", "study": "s50414267"})
    invalid = by_id["p11/p11000011/s51000011"]
    assert invalid.skip == "invalid_utf8"
    assert str(bad) in invalid.message and "byte offset 15" in invalid.message
    assert by_id["p11/p11000011/s51000012"].skip == "no_section"
    assert len(list(iter_mimic_reports(str(tmp_path), ORDER, limit=1))) == 1


def test_unreadable_files_come_back_as_errors(tmp_path):
    (tmp_path / "ok.txt").write_text("x")
    (tmp_path / "folder.txt").mkdir()
    results = dict(read_files([str(tmp_path / "ok.txt"), str(tmp_path / "folder.txt"), str(tmp_path / "gone.txt")], workers=2))
    assert results[str(tmp_path / "ok.txt")] == b"x"
    assert isinstance(results[str(tmp_path / "folder.txt")], OSError)
    assert isinstance(results[str(tmp_path / "gone.txt")], OSError)


def test_missing_folder_is_an_actionable_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .txt reports under .*corpus.path"):
        list(iter_mimic_reports(str(tmp_path / "nowhere"), ORDER))


def test_folder_links_are_not_followed_and_links_outside_the_root_are_skipped(tmp_path):
    """The tree that counted 448 reports instead of 8: a folder link to its parent, and a file
    link to a report outside corpus.path."""
    root = tmp_path / "files"
    study = root / "p10" / "p10000032"
    study.mkdir(parents=True)
    for i in range(8):
        (study / f"s5000000{i}.txt").write_text(f"IMPRESSION: Finding {i}.")
    (study / "loop").symlink_to("..", target_is_directory=True)  # a cycle
    (root / "p10" / "again").symlink_to(study, target_is_directory=True)  # the same files twice
    (study / "s59999999.txt").symlink_to(study / "s50000000.txt")  # a file link inside: read once
    secret = tmp_path / "elsewhere" / "s60000000.txt"
    secret.parent.mkdir()
    secret.write_text("IMPRESSION: Not part of the corpus.")
    (study / "s50000009.txt").symlink_to(secret)
    (root / "outside_dir").symlink_to(secret.parent, target_is_directory=True)

    records = list(iter_mimic_reports(str(root), ORDER))
    read = [r for r in records if r.skip is None]
    assert sorted(r.text for r in read) == [f" Finding {i}." for i in range(8)]  # each file once
    outside = [r for r in records if r.skip == "outside_root"]
    assert len(outside) == 2 and len(records) == 10
    assert all(str(secret.parent) in r.message and str(root) in r.message for r in outside)
    assert not any("Not part" in (r.text or "") for r in records)
