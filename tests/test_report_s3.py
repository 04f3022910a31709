"""analyze and report on a run that lives in S3 (SeaweedFS on loopback, tests/s3server.py)."""

import io
import re

import numpy as np
import pandas as pd
import pytest

from cxrmem.config import load_config
from cxrmem.runfiles import RunLayout
from cxrmem.stages import analyze, report
from cxrmem.storage import Store
from tests.test_analysis import N, _pid, _write_run

pytestmark = pytest.mark.s3


def test_analyze_and_report_read_and_write_s3(tmp_path, s3_bucket, s3_server):
    d_mem = np.random.default_rng(1).normal(1.0, 0.05, N)
    d_mem[[0, 1, 2]] = [3.0, 2.5, 2.0]
    local, _, _ = _write_run(tmp_path, d_mem, np.zeros(N, dtype=bool))
    prefix = f"s3://{s3_bucket}/runs/one"
    remote = RunLayout(prefix)
    for name in ("prompts.parquet", "scores.parquet"):
        Store().write_bytes(remote.path(name), open(local.path(name), "rb").read())
    cfg = load_config(None, [f"run.output={prefix}", f"storage.endpoint_url={s3_server.endpoint_url}",
                             f"storage.region={s3_server.region}"])

    assert analyze.run(cfg).memorized_count == 3
    memorized = pd.read_csv(io.BytesIO(Store().read_bytes(remote.memorized)), dtype={"prompt_id": str})
    assert memorized.columns[0] == "prompt"
    assert memorized["prompt_id"].tolist() == [_pid(0), _pid(1), _pid(2)]
    assert Store().read_json(remote.summary)["analysis"]["memorized_count"] == 3

    result = report.run(cfg)
    assert all(path.startswith(prefix + "/figures/") for path in result.figures)
    names = sorted(path.rsplit("/", 1)[1] for path in result.figures)
    assert names == sorted(["dmem_sorted.png", "dmem_histogram.png", "marker_enrichment.png", "length.png"])
    text = Store().read_text(remote.report)
    assert len(re.findall(r'src="data:image/png;base64,', text)) == len(names)
    assert "Finding 0, compared to <mark>___</mark>." in text
