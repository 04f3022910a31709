"""Long and truncated prompts in a run's outputs (issue 31, item 8), through the `cxrmem` processes.

- A prompt longer than the model reads (prompts.parquet `truncated`, against the tokenizer's
  model_max_length recorded in prepare_summary.json) is flagged with the model's limit in
  memorized_prompts.csv, the report's memorized table, its summary card and summary.md.
- A 50,000-character prompt is shown shortened in report.html, the full text one click away (a
  <details> element), and appears in full once per table that shows it, not at every mention.
"""

import json
import subprocess

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrmem.report import PROMPT_SHOWN
from cxrmem.runfiles import RunLayout
from tests.cli_process import CXRMEM, REPO, cli_env
from tests.test_analysis import N, _pid, _write_run

LIMIT = 128


def long_text(n_chars: int) -> str:
    words = "Small left pleural effusion with adjacent atelectasis, compared to ___ unchanged. "
    return (words * (n_chars // len(words) + 1))[:n_chars]


def cxrmem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CXRMEM, *args], env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=120)


def run_with_a_long_memorized_prompt(out) -> tuple[RunLayout, str]:
    """A scored run whose top prompt is 50,000 characters (truncated at LIMIT tokens), with mitigation rows and a
    generation grid for it, as the stages leave them."""
    d_mem = np.random.default_rng(1).normal(1.0, 0.05, N)
    d_mem[[0, 1, 2]] = [3.0, 2.5, 2.0]
    layout, _, _ = _write_run(out, d_mem, np.zeros(N, dtype=bool))
    text = long_text(50_000)
    for uri in (layout.prompts, layout.scores):
        table = pq.read_table(uri).to_pandas()
        table.loc[0, "prompt"], table.loc[0, "n_tokens"], table.loc[0, "truncated"] = text, 9_000, True
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), uri)
    with open(layout.prepare_summary, "w") as stream:
        json.dump({"max_length": LIMIT, "truncated_unique": 1}, stream)
    rows = []
    for strategy in ("original", "random_word", "embedding_noise", "guidance_rescaling"):
        used = text.replace("pleural", "velvet", 1) if strategy == "random_word" else text
        rows.append({"prompt_id": _pid(0), "prompt": text, "strategy": strategy, "mitigated_prompt": used,
                     "d_mem": 3.0, "pairwise_distance": 0.3, "changed": True})
    pq.write_table(pa.Table.from_pylist(rows), layout.mitigation)
    grid = np.random.default_rng(0).random((4, 16, 16))
    (out / "figures").mkdir(exist_ok=True)
    np.savez(out / "figures" / f"generations_{_pid(0)}.npz", **{s["strategy"]: grid for s in rows})
    return layout, text


def test_a_long_truncated_memorized_prompt_is_flagged_and_shown_shortened(tmp_path):
    layout, text = run_with_a_long_memorized_prompt(tmp_path)
    analyzed = cxrmem("analyze", f"run.output={tmp_path}")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    assert "1 of the 3 memorized prompts are longer than the model's 128 tokens" in analyzed.stderr

    memorized = pd.read_csv(layout.memorized, dtype={"prompt_id": str}, keep_default_na=False)
    top = memorized.iloc[0]
    assert top["prompt"] == text and bool(top["truncated"]) and int(top["token_limit"]) == LIMIT
    assert memorized["truncated"].tolist() == [True, False, False]

    reported = cxrmem("report", f"run.output={tmp_path}", "report.figures=false", "report.top_prompts=1")
    assert reported.returncode == 0, reported.stderr[-3000:]
    html = open(layout.report, encoding="utf-8").read()
    # In full once in the memorized table (inside <details>) and once in the mitigation grid's `original` row; the
    # strategies that kept the text say so instead of repeating it.
    assert html.count(text.replace("___", "<mark>___</mark>")) == 2, html.count(text[:1000])
    assert html.count("<details class=\"long\">") == 3  # the table, original, random_word's rewrite
    assert "(50,000 characters: click for the full text)" in html and "<i>the original text</i>" in html
    cell = html[html.index('id="memorized-table"'):]
    assert f'data-value="{text[:PROMPT_SHOWN]}"' in cell  # the sort key: the beginning, not a second full copy
    assert "truncated: 9,000 tokens, the model reads 128" in cell
    card = html[html.index('id="summary"'):html.index("</section>")]
    assert "1 of the 3 memorized prompts are longer than the model's limit of 128 tokens" in card
    summary_md = open(layout.summary_md, encoding="utf-8").read()
    assert "Truncated: 1 of the 3 memorized prompts are longer than the model's limit of 128 tokens" in summary_md


def test_short_untruncated_prompts_show_no_flag(tmp_path):
    d_mem = np.random.default_rng(1).normal(1.0, 0.05, N)
    d_mem[[0, 1, 2]] = [3.0, 2.5, 2.0]
    layout, _, _ = _write_run(tmp_path, d_mem, np.zeros(N, dtype=bool))
    assert cxrmem("analyze", f"run.output={tmp_path}").returncode == 0
    assert "token_limit" not in pd.read_csv(layout.memorized).columns
    assert cxrmem("report", f"run.output={tmp_path}", "report.figures=false").returncode == 0
    html = open(layout.report, encoding="utf-8").read()
    assert "truncated prompts" not in html and 'class="flag"' not in html and "<details class=\"long\">" not in html
