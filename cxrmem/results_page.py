"""A results page (bench/RESULTS.md): each measurement owns one `## ` section and replaces only it.

`cxrmem testbed evaluate` writes its testbed's section here, and so do the bench scripts
(bench/*.py), so that rerunning one measurement leaves the others' numbers as they were. Each
section names the machine it ran on with `cpu_name()`.
"""

from __future__ import annotations

import os
import platform
import re


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (what `lscpu` prints), else platform's word for it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def replace_section(document: str, heading: str, section: str) -> str:
    """Swap the markdown section under the line `heading` for `section`, or append it."""
    found = re.search(rf"^{re.escape(heading)}$", document, re.MULTILINE)  # the whole line: headings share prefixes
    if found is None:
        return document.rstrip("\n") + ("\n\n" if document.strip() else "") + section
    start = found.start()
    end = document.find("\n## ", start + len(heading))
    rest = document[end + 1 :] if end >= 0 else ""
    return document[:start] + section + ("\n" + rest if rest else "")


def write_results(path: str, heading: str, section: str) -> None:
    """Replace (or append) the section under `heading` in the page at `path`, creating the page if need be."""
    document = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as stream:
            document = stream.read()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(replace_section(document, heading, section))
