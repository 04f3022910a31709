"""Benchmark (not a test): the calibrated calls judged by the harm, and the reference the tail needs (issue 34).

Reads audited runs with a reference (scores.parquet, calibration.parquet, reference/): by default those that
bench/calibration.py writes under runs/calibration (`model`, `iuxray_heldout`); `--run model=runs/demo` reads
the demo's run (`make demo`: G=4, T=20, its 300-prompt reference testbed/model/reference.csv) instead.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/calibration_harm.py copies [--generations 4]
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/calibration_harm.py reference-size [--draws 20]

`copies`: the truth for FDR is the harm. Every discovery at q <= 0.10 (which holds those at q <= 0.05), a
seeded random sample of non-discoveries (q > 0.10) and a seeded sample of reference prompts (never trained on)
get G generations at w = 1, the guidance where the testbed reproduces its training images (at the scoring
w = 7.5 its memorized generations are over-guided noise: bench/RESULTS.md, "Copies"). Each generation is
searched against every training image of the testbed (its phantoms, cxrmem/testbed/export.py; `pixel`
embedder at the testbed's image size, exact top-k). A prompt copies its training image when its closest
generation's nearest image is its own training image and that similarity exceeds the copy threshold: the
`copies.threshold_quantile` (0.99) of the reference prompts' max similarities. The threshold is calibrated on
the reference, not on the non-discovery sample, since a threshold taken from the sample it is then applied to
fixes that sample's copy rate at about 1% by construction; a reference prompt has no training image, so how
close it comes to one is the null of "close by chance". Realized FDR = share of discoveries that do not copy,
with its two-sided Clopper-Pearson 95% interval.

`reference-size`: how many reference prompts the fitted tail needs. The reference is subsampled (seeded draws
without replacement) and the corpus recalibrated at the run's analyze settings; per size: how often the tail
is fitted and passes its check, the discoveries at q <= 0.05 on the corpus, the planted recall, and the same
at 100K prompts: the corpus's p-values together with 100K - n uniform p-values (non-members whose p-values are
valid), Benjamini-Hochberg over all, discoveries counted among the corpus's prompts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from cxrmem.results_page import cpu_name, write_results

SECTIONS = {
    "copies": "## Calibrated calls judged by copies (CPU)",
    "reference-size": "## Reference size for the fitted tail (CPU)",
    "settings": "## Calibration settings on the testbeds and a split null (CPU)",
}
LEVELS = (0.05, 0.10)
TESTBEDS = {  # run name under --work: (label, model dir, the testbed's training config)
    "model": ("testbed/model", "testbed/model", "conf/testbed.yaml"),
    "iuxray_heldout": ("testbed/iuxray_heldout", "testbed/iuxray_heldout", "conf/testbed_iuxray_heldout.yaml"),
}


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(k, n, alpha=0.05, method="beta") if n else (np.nan, np.nan)
    return float(low), float(high)


def run_frames(run: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(corpus: prompt_id, prompt, n_tokens, d_mem, p_value, q_value; reference: prompt_id, prompt, n_tokens, d_mem)."""
    prompts = pd.read_parquet(f"{run}/prompts.parquet", columns=["prompt_id", "prompt", "n_tokens"])
    scores = pd.read_parquet(f"{run}/scores.parquet", columns=["prompt_id", "d_mem", "nonfinite"])
    corpus = prompts.merge(scores, on="prompt_id").merge(pd.read_parquet(f"{run}/calibration.parquet"), on="prompt_id")
    ref = pd.read_parquet(f"{run}/reference/prompts.parquet", columns=["prompt_id", "prompt", "n_tokens"])
    ref = ref.merge(pd.read_parquet(f"{run}/reference/scores.parquet", columns=["prompt_id", "d_mem", "nonfinite"]), on="prompt_id")
    return corpus, ref[np.isfinite(ref["d_mem"]) & ~ref["nonfinite"]]


def parse_setting(choice: str):
    """CalibrationSettings of `BINS,TAIL_QUANTILE[,LO:HI]` (LO:HI: analyze.reference_spread; omitted: the interquartile
    range, the only spread before 2026-12-08, so that the tables of bench/RESULTS.md written then still reproduce)."""
    from cxrmem.calibration import CalibrationSettings

    bins, quantile, *spread = choice.split(",")
    quantiles = [float(q) for q in spread[0].split(":")] if spread else [0.25, 0.75]
    return CalibrationSettings(reference_length_bins=int(bins), reference_tail_quantile=float(quantile), reference_spread=quantiles)


def calibrated_frames(run: str, setting: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """run_frames, the corpus's p- and q-values recalibrated at `setting` (None: the run's own)."""
    corpus, ref = run_frames(run)
    if setting is None:
        return corpus, ref
    result = recalibrate(corpus, ref, parse_setting(setting))
    return corpus.assign(p_value=result.p_value, q_value=result.q_value), ref


def planted_ids(model_dir: str) -> set:
    from cxrmem.analysis import known_memorized_ids

    return known_memorized_ids(pd.read_csv(f"{model_dir}/manifest.csv"))


# -- copies ---------------------------------------------------------------------------------------------
def checked_frame(corpus: pd.DataFrame, ref: pd.DataFrame, planted: set, n_sample: int, n_reference: int, seed: int) -> pd.DataFrame:
    """Every discovery at the largest level, a seeded sample of the other prompts, the planted prompts that are neither
    (the harm the calls miss; not part of the sample's rate), a seeded sample of the reference."""
    top = corpus["q_value"] <= max(LEVELS)
    rng = np.random.default_rng(seed)
    others = corpus[~top]
    sample = others.iloc[np.sort(rng.choice(len(others), min(n_sample, len(others)), replace=False))]
    missed = others[others["prompt_id"].isin(planted) & ~others["prompt_id"].isin(sample["prompt_id"])]
    refs = ref.iloc[np.sort(rng.choice(len(ref), min(n_reference, len(ref)), replace=False))]
    return pd.concat([corpus[top].assign(group="discovery"), sample.assign(group="non-discovery"), missed.assign(group="missed planted"),
                      refs.assign(group="reference", q_value=np.nan)], ignore_index=True)  # fmt: skip


def training_index(model_dir: str, config: str, folder: str):
    """(image table with each image's prompt_id as the corpus spells it, pixel embeddings [M, D], image size)."""
    from cxrmem.config import load_config
    from cxrmem.copies.embedders import EmbedderSettings, make_embedder
    from cxrmem.copies.images import read_image
    from cxrmem.corpus.text import normalise_whitespace, prompt_id
    from cxrmem.testbed.export import export_training_images

    cfg = load_config(config, [f"testbed.out={model_dir}"])
    table = export_training_images(model_dir, folder, cfg.corpus)
    table["corpus_id"] = [prompt_id(normalise_whitespace(str(p))) for p in table["prompt"]]
    embedder = make_embedder(EmbedderSettings(name="pixel", size=cfg.testbed.image_size))
    return table, embedder([read_image(Path(p).read_bytes(), p) for p in table["path"]]), embedder, cfg


def copy_check(name: str, work: dict, args) -> pd.DataFrame:
    """Generate, search, and judge every checked prompt of one testbed's run (see the module docstring); the rows
    are kept in the run as copies_check_g<G>.csv (`--reuse` reads them back instead)."""
    import torch
    from omegaconf import OmegaConf

    from cxrmem.copies.evidence import calibrate_threshold
    from cxrmem.copies.find import nearest_images
    from cxrmem.copies.generation import generate
    from cxrmem.copies.settings import CopiesSettings
    from cxrmem.models.loading import load_components
    from cxrmem.scoring.scorer import Scorer

    suffix = "" if args.setting is None else "_" + args.setting.replace(",", "_").replace(":", "-")
    saved = f"{work[name]}/copies_check_g{args.generations}{suffix}.csv"
    if args.reuse and os.path.exists(saved):
        return pd.read_csv(saved)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _, model_dir, config = TESTBEDS[name]
    corpus, ref = calibrated_frames(work[name], args.setting)
    frame = checked_frame(corpus, ref, planted_ids(model_dir), args.sample, args.reference_sample, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        table, index, embedder, cfg = training_index(model_dir, config, folder)
    scorer = Scorer(load_components(OmegaConf.merge(cfg.model, {"path": model_dir}), cfg.storage),
                    OmegaConf.merge(cfg.score, {"steps": args.steps, "screening_steps": None}), device="cpu")  # fmt: skip
    settings = CopiesSettings(generations=args.generations, batch_size=16)
    images = generate(scorer, frame["prompt"].tolist(), frame["prompt_id"].tolist(), args.generations, args.guidance, 16)
    sims, rows = nearest_images(embedder, images, index, settings)
    top1 = sims[:, :, 0]
    best = top1.argmax(axis=1)
    nearest = table["corpus_id"].to_numpy()[rows[np.arange(len(best)), best, 0]]
    threshold = calibrate_threshold(top1.max(axis=1)[frame["group"].to_numpy() == "reference"], settings.threshold_quantile)
    frame = frame.assign(max_similarity=top1.max(axis=1), own_image=nearest == frame["prompt_id"].to_numpy(), threshold=threshold.value,
                         planted=frame["prompt_id"].isin(planted_ids(model_dir)))  # fmt: skip
    frame["above_threshold"] = frame["max_similarity"] > threshold.value
    frame["copies"] = frame["own_image"] & frame["above_threshold"]
    frame.drop(columns=["prompt"]).to_csv(saved, index=False)
    return frame


def summarize(label: str, frame: pd.DataFrame, corpus: pd.DataFrame, generations: int) -> list[dict]:
    """Per level: the discoveries and their copies, and the copies among the non-discoveries (the band between the
    level and the largest one checked in full, the rest estimated from the seeded sample)."""
    sample = frame[frame["group"] == "non-discovery"]
    rest = int((corpus["q_value"] > max(LEVELS)).sum())
    refs = frame[frame["group"] == "reference"]
    missed = frame[frame["group"] == "missed planted"]
    threshold = float(frame["threshold"].iloc[0])
    rows = []
    for level in LEVELS:
        checked = frame[frame["group"] == "discovery"]
        called, band = checked[checked["q_value"] <= level], checked[checked["q_value"] > level]
        false = int((~called["copies"]).sum())
        copying = int(sample["copies"].sum())
        estimate = (int(band["copies"].sum()) + copying / len(sample) * rest) / (len(band) + rest)
        rows.append({"testbed": label, "corpus": len(corpus), "generations": generations, "threshold": threshold, "level": level,
                     "discoveries": len(called), "copy": int(called["copies"].sum()), "planted": int(called["planted"].sum()),
                     "fdr": false / len(called) if len(called) else None, "ci": clopper_pearson(false, len(called)),
                     "band": (int(band["copies"].sum()), len(band)), "sample": (copying, len(sample), int(sample["planted"].sum())),
                     "sample_ci": clopper_pearson(copying, len(sample)), "non_discovery_rate": estimate,
                     "reference": (int(refs["above_threshold"].sum()), len(refs)),
                     "missed": (int(missed["copies"].sum()), len(missed)) if len(missed) else None})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def copies_markdown(rows: list[dict], args) -> str:
    lines = [SECTIONS["copies"], "",
             "Command: `OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 10 .venv/bin/python bench/calibration_harm.py copies "
             f"--run model=runs/demo --generations {args.generations}` (CPU: {cpu_name()}, 2 cores shared). Generations: "
             f"G={args.generations} per prompt at w={args.guidance:g}, T={args.steps}; `pixel` embedder at the testbed's image "
             "size, exact search over all its training images. A prompt copies when its closest generation's nearest "
             "training image is its own and the similarity exceeds the threshold (the 0.99 quantile of the max similarity "
             f"of {args.reference_sample} seeded reference prompts, which have no training image: with 100, their maximum). "
             "FDR by copies: share of discoveries that do not copy, two-sided Clopper-Pearson 95% interval. "
             "Non-discoveries: those between the level and q = 0.10 are all checked, those above q = 0.10 through a seeded "
             f"sample of {args.sample}; the copy rate among all non-discoveries is estimated from both.", "",
             "| testbed (prompts) | G | threshold | level | discoveries | copying | FDR by copies [95% CI] | planted among them "
             "| non-discoveries: copying in the band to q=0.10 | q>0.10 sample: copying / sampled [95% CI] (planted) "
             "| copy rate among all non-discoveries (est.) | reference above threshold | planted above q=0.10, outside the sample: copying |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        s, b, ci, missed = r["sample"], r["band"], r["sample_ci"], r["missed"]
        fdr = "–" if r["fdr"] is None else f"**{r['fdr']:.2f}** [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
        lines.append(f"| {r['testbed']} ({r['corpus']}) | {r['generations']} | {r['threshold']:.3f} | q<={r['level']:g} | {r['discoveries']} "
                     f"| {r['copy']} | {fdr} | {r['planted']} | {b[0]}/{b[1]} | {s[0]}/{s[1]} [{ci[0]:.3f}, {ci[1]:.3f}] ({s[2]}) "
                     f"| {r['non_discovery_rate']:.3f} | {r['reference'][0]}/{r['reference'][1]} "
                     f"| {'not checked' if missed is None else f'{missed[0]}/{missed[1]}'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# -- reference size -------------------------------------------------------------------------------------
def recalibrate(corpus: pd.DataFrame, ref: pd.DataFrame, settings):
    from cxrmem.calibration import calibrate

    scores = np.where(corpus["nonfinite"], np.nan, corpus["d_mem"].to_numpy(np.float64))
    return calibrate(scores, np.log(corpus["n_tokens"].to_numpy(np.float64)), ref["d_mem"].to_numpy(np.float64),
                     np.log(ref["n_tokens"].to_numpy(np.float64)), settings)  # fmt: skip


def padded_bh(p: np.ndarray, total: int, rng) -> np.ndarray:
    """BH q-values of the corpus's p-values among `total` prompts, the others uniform non-members."""
    from statsmodels.stats.multitest import multipletests

    finite = p[np.isfinite(p)]
    pad = rng.uniform(size=max(total - len(finite), 0))
    q = multipletests(np.concatenate([finite, pad]), method="fdr_bh")[1][: len(finite)]
    out = np.full(len(p), np.nan)
    out[np.isfinite(p)] = q
    return out


def size_rows(name: str, work: dict, sizes: list[int], draws: int, total: int, settings) -> list[dict]:
    label, model_dir, _ = TESTBEDS[name]
    corpus, ref = run_frames(work[name])
    planted = corpus["prompt_id"].isin(planted_ids(model_dir)).to_numpy()
    rows = []
    for size in [s for s in sizes if s <= len(ref)]:
        found = []
        for draw in range(draws if size < len(ref) else 1):
            rng = np.random.default_rng(1000 * size + draw)
            sub = ref.iloc[rng.choice(len(ref), size, replace=False)]
            result = recalibrate(corpus, sub, settings)
            big = padded_bh(result.p_value, total, rng)
            tail = result.tail
            found.append({"fitted": tail is not None, "used": bool(tail and tail.used), "shape": tail.shape if tail else np.nan,
                          **{f"{where}_{what}": int(((q <= 0.05) & mask).sum()) for where, q in (("own", result.q_value), ("100k", big))
                             for what, mask in (("calls", np.ones_like(planted)), ("planted", planted))}})  # fmt: skip
        f = pd.DataFrame(found)
        rows.append({"testbed": label, "settings": f"{settings.reference_length_bins}, {settings.reference_tail_quantile}",
                     "reference": size, "draws": len(f), "used": f["used"].mean(), "shape": f["shape"].median(),
                     **{c: f[c].median() for c in f.columns if c.startswith(("own_", "100k_"))}, "planted": int(planted.sum()),
                     "recall_100k_min": f["100k_planted"].min() / planted.sum()})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def size_markdown(rows: list[dict], args) -> str:
    lines = [SECTIONS["reference-size"], "",
             "Command: `OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/calibration_harm.py reference-size "
             f"--draws {args.draws} [--bins B --tail-quantile Q]` (CPU: {cpu_name()}; no model work: the runs' scores are "
             f"recalibrated). Each reference size: {args.draws} seeded subsamples of the run's reference (one at its full size); "
             f"medians over the draws. \"At {args.total:,}\": the corpus's p-values among {args.total:,} prompts, the others "
             "uniform p-values, BH at 0.05.", "",
             "| testbed | length bins, tail quantile | reference | tail used (share of draws) | GPD shape | q<=0.05 on the corpus: "
             f"calls, planted | at {args.total:,}: calls, planted (worst draw's recall) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['testbed']} | {r['settings']} | {r['reference']} | {r['used']:.2f} | {r['shape']:.2f} "
                     f"| {r['own_calls']:.0f}, {r['own_planted']:.0f} of {r['planted']} "
                     f"| {r['100k_calls']:.0f}, {r['100k_planted']:.0f} ({r['recall_100k_min']:.2f}) |")  # fmt: skip
    return "\n".join(lines) + "\n"


def split_null(ref: pd.DataFrame, settings, draws: int, share: float) -> tuple[float, float, float]:
    """The reference split at random, `share` of it audited against the rest (both never seen: F0 must not be
    supported): (share of draws where Simes' p < 0.05, mean discoveries at q <= 0.05, share of draws where F0's
    exceedance test gives p < 0.05)."""
    from cxrmem.calibration import exceedance_test, global_null_p

    supported, calls, exceeded = [], [], []
    for draw in range(draws):
        order = np.random.default_rng(draw).permutation(len(ref))
        cut = int(round(share * len(ref)))
        audited = ref.iloc[order[:cut]].assign(nonfinite=False)
        result = recalibrate(audited, ref.iloc[order[cut:]], settings)
        supported.append((global_null_p(result.q_value) or 1.0) < 0.05)
        calls.append(int((result.q_value <= 0.05).sum()))
        exceeded.append(exceedance_test(audited["d_mem"].to_numpy(np.float64), result.length_bin, result.bins).p_value < 0.05)
    return float(np.mean(supported)), float(np.mean(calls)), float(np.mean(exceeded))


def setting_rows(name: str, work: dict, choices: list[str], draws: int, share: float) -> list[dict]:
    """Per analyze setting (`bins,tail_quantile[,lo:hi]`, parse_setting): the corpus's calls, the tail fit, the length
    bias, the split null."""
    from scipy.stats import spearmanr

    from cxrmem.calibration import exceedance_test, global_null_p

    label, model_dir, _ = TESTBEDS[name]
    corpus, ref = run_frames(work[name])
    planted = corpus["prompt_id"].isin(planted_ids(model_dir)).to_numpy()
    rows = []
    for choice in choices:
        settings = parse_setting(choice)
        result = recalibrate(corpus, ref, settings)
        others = ~planted & np.isfinite(result.p_value)
        f0 = exceedance_test(np.where(corpus["nonfinite"], np.nan, corpus["d_mem"].to_numpy(np.float64)), result.length_bin, result.bins)
        rows.append({"testbed": label, "setting": choice, "tail": result.tail, "simes": global_null_p(result.q_value), "f0": f0,
                     **{level: (int((result.q_value <= level).sum()), int(((result.q_value <= level) & planted).sum())) for level in LEVELS},
                     "planted": int(planted.sum()), "length_rho": float(spearmanr(result.p_value[others], corpus["n_tokens"][others]).statistic),
                     "null": split_null(ref, settings, draws, share)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def settings_markdown(rows: list[dict], args) -> str:
    lines = [SECTIONS["settings"], "",
             f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/calibration_harm.py settings --draws {args.draws}` "
             f"(CPU: {cpu_name()}; no model work). Length bias: Spearman of the p-value with the token count over the unplanted "
             f"prompts. Split null: the run's reference cut at random ({args.draws} seeded draws), {args.null_share:.0%} of it audited "
             "against the rest; both parts are non-members, so F0 must read not supported (in at most 5% of the draws).", "",
             "| testbed | length bins, tail quantile | tail: GPD shape, check p | Simes p | F0: beyond (expected), p | "
             "q<=0.05: calls, planted (recall) | q<=0.10: calls, planted | length bias | split null: Simes supported "
             "(share of draws), mean calls | split null: F0 supported |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        tail = f"{r['tail'].shape:.2f}, {r['tail'].check_p:.2f}" if r["tail"] else "none"
        (c5, p5), (c10, p10) = r[0.05], r[0.1]
        f0 = r["f0"]
        lines.append(f"| {r['testbed']} | {r['setting']} | {tail} | {r['simes']:.2g} | {f0.beyond} ({f0.expected:.1f}), {f0.p_value:.2g} "
                     f"| {c5}, {p5} ({p5 / r['planted']:.2f}) | {c10}, {p10} | {r['length_rho']:+.2f} | {r['null'][0]:.2f}, {r['null'][1]:.2f} "
                     f"| {r['null'][2]:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=list(SECTIONS))
    parser.add_argument("--work", default="runs/calibration")
    parser.add_argument("--run", nargs="*", default=[], help="NAME=RUN: read testbed NAME from the run at RUN, not WORK/NAME")
    parser.add_argument("--testbeds", nargs="+", default=list(TESTBEDS), choices=list(TESTBEDS))
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sample", type=int, default=100, help="non-discoveries checked per testbed")
    parser.add_argument("--reference-sample", type=int, default=100, help="reference prompts that calibrate the copy threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="copies: read the checked rows a previous run kept")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 150, 200, 250, 300, 400, 546])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--total", type=int, default=100_000)
    parser.add_argument("--settings", nargs="+", default=["4,0.9", "1,0.9", "2,0.8", "3,0.8", "3,0.9"], help="BINS,TAIL_QUANTILE[,LO:HI] (reference_spread)")
    parser.add_argument("--setting", default=None, help="copies: recalibrate the runs at BINS,TAIL_QUANTILE[,LO:HI] first (default: their own q-values)")
    parser.add_argument("--null-share", type=float, default=0.2, help="settings: share of the reference audited in the split null")
    parser.add_argument("--bins", type=int, default=3, help="analyze.reference_length_bins (reference-size; the spread is the config's)")
    parser.add_argument("--tail-quantile", type=float, default=0.9, help="analyze.reference_tail_quantile")
    parser.add_argument("--results", default=None, help="write the table into this page (bench/RESULTS.md)")
    args = parser.parse_args()
    work = {name: f"{args.work}/{name}" for name in TESTBEDS} | dict(item.split("=", 1) for item in args.run)
    if args.what == "copies":
        rows = [r for name in args.testbeds
                for r in summarize(TESTBEDS[name][0], copy_check(name, work, args), calibrated_frames(work[name], args.setting)[0],
                                   args.generations)]  # fmt: skip
        text = copies_markdown(rows, args)
    elif args.what == "settings":
        text = settings_markdown([r for name in args.testbeds for r in setting_rows(name, work, args.settings, args.draws, args.null_share)], args)
    else:
        from cxrmem.calibration import CalibrationSettings

        settings = CalibrationSettings(reference_length_bins=args.bins, reference_tail_quantile=args.tail_quantile)
        rows = [r for name in args.testbeds for r in size_rows(name, work, args.sizes, args.draws, args.total, settings)]
        text = size_markdown(rows, args)
    print(text)
    if args.results:
        write_results(args.results, SECTIONS[args.what], text)


if __name__ == "__main__":
    main()
