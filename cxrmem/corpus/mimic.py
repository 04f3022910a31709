"""MIMIC-CXR free-text reports as distributed (`files/pNN/pNNNNNNNN/sNNNNNNNN.txt`).

The prompt is a report section (docs/design.md, Prompts): IMPRESSION, falling back to FINDINGS, then
the last paragraph (order: corpus.sections). Headers are found with some tolerance, because the
reports are typed by people: any case, spaces before the colon, plural forms, CONCLUSION for
IMPRESSION, and one- or two-letter typos ("IMPRESSlON", "FINIDNGS") of a known header name.
Addenda (an ADDENDUM header up to the next FINAL REPORT header, or the end) are not part of the
original report and are never used as the prompt.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Iterable, Iterator, Optional

from cxrmem.corpus.files import corpus_files
from cxrmem.corpus.text import SourceText, decode_utf8, pick_section, skipped
from cxrmem.storage import Store

logger = logging.getLogger(__name__)

# Known header names -> the section they open. Headers that are not prompt sources still matter:
# they end the section before them.
_HEADERS = {
    "IMPRESSION": "IMPRESSION",
    "IMPRESSIONS": "IMPRESSION",
    "CONCLUSION": "IMPRESSION",
    "CONCLUSIONS": "IMPRESSION",
    "FINDINGS": "FINDINGS",
    "FINDING": "FINDINGS",
    "ADDENDUM": "ADDENDUM",
    "FINAL REPORT": "FINAL REPORT",
    **{
        name: name
        for name in (
            "EXAMINATION",
            "EXAM",
            "INDICATION",
            "INDICATIONS",
            "HISTORY",
            "CLINICAL HISTORY",
            "CLINICAL INFORMATION",
            "REASON FOR EXAMINATION",
            "REASON FOR EXAM",
            "TYPE OF EXAMINATION",
            "TECHNIQUE",
            "COMPARISON",
            "COMPARISONS",
            "PROCEDURE",
            "NOTIFICATION",
            "RECOMMENDATION",
            "RECOMMENDATIONS",
            "RECOMMENDATION(S)",
            "WET READ",
        )
    },
}

# A header is the text between a line start and a colon ("IMPRESSION:", " Impression :"), or an
# upper-case tail of it ("Lungs clear.  IMPRESSION:"). FINAL REPORT and ADDENDUM may also stand
# alone on their line. Scanning colons (a few per report) is much faster than a regex over the text.
_ALONE = re.compile(r"^[ \t]*(FINAL REPORT|ADDENDUM)[ \t]*:?[ \t]*$", re.M | re.I)
_HEADER_CHARS = re.compile(r"[A-Za-z][A-Za-z0-9()/ \t]*")
_WORD = re.compile(r"\S+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_MIMIC_PATH = re.compile(r"p(\d{2})/(p\d+)/(s\d+)\.txt$")


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@lru_cache(maxsize=65536)
def header_kind(candidate: str) -> Optional[str]:
    """The section a header candidate opens, tolerating case, spacing and small typos; None if not a header."""
    if len(candidate) > 48 or not _HEADER_CHARS.fullmatch(candidate):
        return None
    name = " ".join(candidate.upper().split())
    if name in _HEADERS:
        return _HEADERS[name]
    if len(name) < 5:
        return None  # short words are too easy to confuse with a header by one typo
    budget = 1 if len(name) < 8 else 2
    for known, kind in _HEADERS.items():
        if abs(len(known) - len(name)) <= budget and (known[0] == name[0] or known[-1] == name[-1]):
            if _edit_distance(name, known) <= budget:
                return kind
    return None


def _upper_tail_header(head: str) -> Optional[tuple[int, str]]:
    """(offset, kind) of a header made of the last upper-case words of `head` (longest first), if any."""
    words = [(m.start(), m.group()) for m in _WORD.finditer(head)]
    first = len(words)
    while first > 0 and len(words) - first < 4 and words[first - 1][1].isupper():
        first -= 1
    for k in range(first, len(words)):
        kind = header_kind(" ".join(word for _, word in words[k:]))
        if kind is not None:
            return words[k][0], kind
    return None


def _headers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every recognised header, in text order."""
    headers = []
    colon = text.find(":")
    while colon >= 0:
        line_start = text.rfind("\n", 0, colon) + 1
        head = text[line_start:colon]
        kind = header_kind(head.strip())
        if kind is not None:
            headers.append((line_start + len(head) - len(head.lstrip()), colon + 1, kind))
        elif head[-1:].isupper():
            tail = _upper_tail_header(head)
            if tail is not None:
                headers.append((line_start + tail[0], colon + 1, tail[1]))
        colon = text.find(":", colon + 1)
    upper = text.upper()
    if "ADDENDUM" in upper or "FINAL REPORT" in upper:
        starts = {header[0] for header in headers}
        for match in _ALONE.finditer(text):
            if match.start(1) not in starts:  # "ADDENDUM:" was found above already
                headers.append((match.start(1), match.end(), _HEADERS[match.group(1).upper()]))
    return sorted(headers)


def split_sections(text: str) -> tuple[dict[str, str], str]:
    """The report's sections (first occurrence of each, addenda excluded) and its last paragraph."""
    headers = _headers(text)
    sections: dict[str, str] = {}
    main_parts = [text[: headers[0][0]] if headers else text]
    in_addendum = False
    for i, (_, end, kind) in enumerate(headers):
        content = text[end : headers[i + 1][0] if i + 1 < len(headers) else len(text)]
        if kind == "ADDENDUM":
            in_addendum = True
        elif kind == "FINAL REPORT":
            in_addendum = False
        if in_addendum:
            continue
        main_parts.append(content)
        if content.strip() and kind not in sections:
            sections[kind] = content
    last_paragraph = ""
    for part in reversed(main_parts):
        paragraphs = [p for p in _PARAGRAPH_BREAK.split(part) if p.strip()]
        if paragraphs:
            last_paragraph = paragraphs[-1]
            break
    return sections, last_paragraph


def extract_prompt(text: str, order) -> tuple[Optional[str], str]:
    """(section used, its text) of a free-text report, by the preference `order`; (None, "") if none."""
    sections, last_paragraph = split_sections(text)
    return pick_section(sections, last_paragraph, order)


def report_ids(uri: str) -> tuple[str, dict]:
    """Source id `pNN/pNNNNNNNN/sNNNNNNNN` and {subject_id, study} from a MIMIC-CXR report path."""
    match = _MIMIC_PATH.search(uri.replace("\\", "/"))
    if match is None:
        return uri, {"subject_id": None, "study": None}
    return f"p{match.group(1)}/{match.group(2)}/{match.group(3)}", {
        "subject_id": match.group(2),
        "study": match.group(3),
    }


def report_to_source(source_id: str, text: str, order, ids: Optional[dict], where: str) -> SourceText:
    section, prompt = extract_prompt(text, order)
    if section is None:
        return skipped(source_id, "no_section", f"{where}: no {' / '.join(order)} text found; the report is empty")
    return SourceText(source_id, prompt, section=section, ids=ids)


def _read(uri: str, store) -> bytes | OSError:
    try:
        return store.read_bytes(uri)
    except OSError as err:
        return err


def read_files(uris: list[str], store: Optional[Store] = None, workers: int = 16, chunk: int = 1024) -> Iterator[tuple[str, bytes | OSError]]:
    """(uri, bytes or the OSError) in order; reads run in threads, since S3 gets are latency-bound."""
    store = store or Store()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i in range(0, len(uris), chunk):
            batch = uris[i : i + chunk]
            yield from zip(batch, pool.map(lambda u: _read(u, store), batch))


def iter_mimic_reports(root: str, order, store: Optional[Store] = None, workers: int = 16, limit: Optional[int] = None) -> Iterable[SourceText]:
    """Every `*.txt` report under `root` (local folder or s3:// prefix), in path order."""
    store = store or Store()
    uris, outside = corpus_files(root, (".txt",), store)
    if not uris:
        raise FileNotFoundError(
            f"no .txt reports under {root}; corpus.path must be the MIMIC-CXR reports folder (files/pNN/pNNNNNNNN/sNNNNNNNN.txt)"
        )
    logger.info("found %d report files under %s", len(uris), root)
    yield from outside
    for uri, data in read_files(uris[:limit], store, workers):
        source_id, ids = report_ids(uri)
        if isinstance(data, OSError):
            yield skipped(source_id, "unreadable", f"{uri}: cannot read ({data}); check the file's permissions")
            continue
        text, message = decode_utf8(data, uri)
        if text is None:
            yield skipped(source_id, "invalid_utf8", message)
            continue
        yield report_to_source(source_id, text, order, ids, uri)
