"""`cxrmem enrich`: the enrichment of a released list, without a model, through the command line."""

import json

import numpy as np
import pandas as pd

from cxrmem.cli import main


def released_lists(tmp_path, marker_effect: float):
    """A memorized and a control list where marker prompts are longer; the memorized list is drawn by
    length (and by the marker when `marker_effect` > 0). The first memorized prompt appears three times."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1500):
        marker = rng.random() < 0.3
        words = int(np.clip(rng.normal(14 + 10 * marker, 4), 3, None))
        text = " ".join(["opacity"] * (words - 1) + [f"w{i}"]) + (" compared to ___." if marker else ".")
        score = np.log(len(text.split())) + marker_effect * marker + rng.normal(0, 0.3)
        rows.append((text, score))
    frame = pd.DataFrame(rows, columns=["prompt", "score"]).sort_values("score", ascending=False)
    memorized, controls = frame.head(150), frame.iloc[150:]
    memorized = pd.concat([memorized.head(1), memorized.head(1), memorized])  # duplicated rows
    controls = pd.concat([controls, memorized.tail(1)])  # one prompt on both lists
    mem, ctrl = tmp_path / "mem.csv", tmp_path / "ctrl.csv"
    memorized[["prompt"]].assign(prompt=lambda f: f["prompt"].str.replace(" ", "  ")).to_csv(mem, index=False)  # whitespace normalised
    controls[["prompt"]].to_csv(ctrl, index=False)
    return mem, ctrl


def run_enrich(capsys, *args):
    code = main(["enrich", *map(str, args)])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err.strip().splitlines()[-1]


def test_enrich_length_confound_on_a_released_list(tmp_path, capsys):
    mem, ctrl = released_lists(tmp_path, 0.0)
    code, result, last = run_enrich(capsys, "--memorized", mem, "--controls", ctrl, "--out", tmp_path / "out")
    assert code == 0
    assert result["memorized"]["rows"] == 152 and result["memorized"]["unique"] == 150  # duplicates once
    assert result["on_both_lists"] == 1 and result["crude"]["n_prompts"] == 150 + 1350
    assert result["by_n_reports"]["buckets"][0]["n_memorized"] == 149  # the duplicated prompt has n_reports 3
    assert result["length_unit"] == "words" and result["length"]["auc_memorized_vs_controls"] > 0.8
    assert result["crude"]["ci_low"] > 1
    adjusted = result["adjusted"]["logistic"]
    assert adjusted["ci_low"] < 1 < adjusted["ci_high"]
    # only the duplicated memorized prompt has n_reports > 1: a separating covariate, dropped and named
    assert adjusted["dropped"] == ["log_n_reports (separates the outcome)"]
    assert result["verdict"]["verdict"] == "not supported after adjustment"
    assert last.startswith("cxrmem enrich: crude OR ") and "adjusted OR" in last and "not supported after adjustment" in last
    assert json.loads((tmp_path / "out" / "enrichment.json").read_text())["crude"] == result["crude"]


def test_enrich_with_the_models_tokenizer_and_bad_input(tmp_path, capsys, tiny_model_dir):
    mem, ctrl = released_lists(tmp_path, 0.2)
    code, result, _ = run_enrich(capsys, "--memorized", mem, "--controls", ctrl, "--tokenizer", f"model.path={tiny_model_dir}")
    assert code == 0 and result["length_unit"] == "tokens"
    assert result["crude"]["ci_low"] > 1 and result["adjusted"]["logistic"]["ci_low"] > 1
    assert result["verdict"]["verdict"] == "supported"
    code, _, last = run_enrich(capsys, "--memorized", mem, "--controls", ctrl, "--text-column", "text")
    assert code == 1 and "no text column 'text'" in last and "prompt" in last
    assert "set --text-column" in last and "corpus.text_column" not in last  # this command's own flag


def small_lists(tmp_path, same: bool = False):
    mem, ctrl = tmp_path / "mem.csv", tmp_path / "ctrl.csv"
    mem.write_text("prompt\nno acute findings ___\nsmall effusion\nsmall effusion\n")
    ctrl.write_text("prompt\nno acute findings ___\nsmall effusion\n" if same else "prompt\nclear lungs\nsmall effusion\nnormal heart\n")
    return mem, ctrl


def test_enrich_error_exits_cleanly_every_time(tmp_path, tiny_model_dir):
    """The missing-column error, 20 times as its own process: exit 1 with one line, never the abort (134) that
    Arrow's threaded CSV reader caused when it released a Python-backed stream while the interpreter exited.
    Every third run loads the model's tokenizer (--tokenizer: torch in the process, whose long shutdown made
    that race likely: 5 of 30 such runs aborted before the fix, so these 7 catch it about 3 times in 4); the rest
    are the plain command, which no longer loads torch (1.3 s each on an idle machine)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from tests.cli_process import CXRMEM, REPO, cli_env

    mem, ctrl = small_lists(tmp_path)
    plain = [CXRMEM, "enrich", "--memorized", str(mem), "--controls", str(ctrl), "--text-column", "text"]
    commands = [plain + (["--tokenizer", f"model.path={tiny_model_dir}"] if i % 3 == 0 else []) for i in range(20)]

    def run(command):
        return subprocess.run(command, env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=120)

    with ThreadPoolExecutor(2) as pool:  # two at a time: the 2-core machine
        done = list(pool.map(run, commands))
    codes = [process.returncode for process in done]
    assert codes == [1] * 20, [(code, process.stderr[-300:]) for code, process in zip(codes, done) if code != 1][:3]
    for process in done:
        assert "terminate called" not in process.stderr
        last = process.stderr.strip().splitlines()[-1]
        assert last.startswith(f"cxrmem enrich: {mem}: no text column 'text'") and "set --text-column" in last, last


def test_enrich_names_the_prompts_on_both_lists_on_stderr(tmp_path):
    import subprocess

    from tests.cli_process import CXRMEM, REPO, cli_env

    mem, ctrl = small_lists(tmp_path, same=True)
    done = subprocess.run([CXRMEM, "enrich", "--memorized", str(mem), "--controls", str(ctrl)], env=cli_env(),
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["on_both_lists"] == 2
    lines = [line for line in done.stderr.splitlines() if "also on the memorized list" in line]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "2 of 2 control prompts" in lines[0] and "every control" in lines[0]
    assert "'no acute findings ___'" in lines[0] and "'small effusion'" in lines[0]
