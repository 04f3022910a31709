"""Benchmark (not a test): a whole audit's denoiser evaluations per corpus prompt, projected to a corpus size.

Every stage on at the configuration's defaults (the cascade, the reference, attribution with the null model,
every mitigation strategy, copies with images), each stage's cost from the declared costs that
tests/test_cost.py holds equal to what the Scorer counts:

- score: the cascade's evaluations per prompt measured on the testbeds (`--cascade-per-prompt`, bench/RESULTS.md
  "Cascade frontier": 9.56 at the default stages, counted) times N, plus the audit sample's full scores;
- reference: `--reference` prompts, each a full score (the cascade does not screen it);
- attribute: the gradient on `attribution.max_prompts` of the M memorized prompts, leave-one-out (`--words` words each)
  on the `attribution.leave_one_out_prompts` most memorized; the null model the same (its leave-one-out only with
  `attribution.null_leave_one_out`);
- mitigate: `mitigation.sample_size` prompts, every strategy's declared evaluations, times `--mitigated-share`
  (1: an upper bound; bench/mitigation_stops.py measures where the sequential rule stops the strategies);
- copies: the same sample and `copies.n_controls` controls at each guidance, N generations of T steps, and each
  checked strategy's generations and preparation on the sample, less mitigation's generations that it reuses at the
  guidance whose settings match (all but the report's top prompts of the sample, and every strategy's); and the
  copy-rate rule's prompts past mitigation's (cxrmem/stages/copies.py continue_undecided), generated fresh at each
  guidance where the unmitigated prompts copy (`--copy-rule-guidances`): `--copy-rule-pairs` prompt-strategy pairs and
  `--copy-rule-prompts` unmitigated prompts at each (measured: bench/sized_vs_exhaustive.py's summaries; the bound is
  copies.max_prompts per strategy).

    PYTHONPATH=$PWD .venv/bin/python bench/audit_cost.py --prompts 100000 --memorized-percent 1
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cxrmem import strategies  # noqa: E402
from cxrmem.attribution import declared_evaluations  # noqa: E402
from cxrmem.config import load_config  # noqa: E402
from cxrmem.copies.settings import guidances  # noqa: E402
from cxrmem.results_page import cpu_name, write_results  # noqa: E402
from cxrmem.scoring.settings import ScoreSettings  # noqa: E402
from cxrmem.stages.cascade import dmem_cost, evaluations  # noqa: E402
from cxrmem.stages.copies_reuse import served_guidance  # noqa: E402
from cxrmem.stages.worker import attribution_settings, mitigation_settings  # noqa: E402

HEADING = "## The whole audit's cost, projected (issue 33)"


def stage_costs(cfg, n: int, memorized: int, args) -> dict[str, float]:
    """stage -> denoiser evaluations of one audit of n prompts with `memorized` of them memorized."""
    score = ScoreSettings.of(cfg.score)
    full = dmem_cost(cfg.score, score.steps)
    full_one = full.per_prompt + full.per_batch / cfg.score.batch_size
    a = attribution_settings(cfg)
    attributed = min(memorized, a.max_prompts or memorized)
    gradient = declared_evaluations(0, a, score)  # no units to leave out: the gradient alone
    loo = (declared_evaluations(args.words, a, score) - gradient) * min(attributed, attributed if a.leave_one_out_prompts is None else a.leave_one_out_prompts)
    m = mitigation_settings(cfg)
    sample = min(memorized, m.sample_size or memorized)
    g, t, nm = score.generations, score.steps, m.n_generations
    # --mitigated-share: the strategies' runs as a share of every strategy on the whole sample (1: the upper bound;
    # bench/mitigation_stops.py measures where the sequential rule stops them); copies checks each strategy on the
    # prompts mitigation ran it on, so its strategy part follows the same share.
    share = args.mitigated_share
    mitigate = share * sample * sum(strategies.row(s).evaluations(m, (g, t), (nm, m.steps or t)) for s in m.strategies)
    nc, checked = cfg.copies.generations, [s for s in m.strategies if s != "original"] if cfg.copies.strategies else []

    def checked_cost(w: float) -> float:
        return share * sample * sum(strategies.row(s).evaluations(m, (0, 0), (nc, t), w) for s in checked)

    def unmitigated(w: float) -> float:  # one prompt's N generations as `original` samples them at w
        return strategies.row("original").evaluations(m, (0, 0), (nc, t), w)

    def rule_cost(w: float) -> float:  # the copy-rate rule's pairs past mitigation's, at the checked strategies' mean cost
        if w not in args.copy_rule_guidances:
            return 0.0
        mean = sum(strategies.row(s).evaluations(m, (0, 0), (nc, t), w) for s in checked) / max(len(checked), 1)
        return args.copy_rule_prompts * unmitigated(w) + args.copy_rule_pairs * mean

    def per_guidance(w: float) -> float:  # the unmitigated sample and the controls, then the strategies
        return (sample + cfg.copies.n_controls) * unmitigated(w) + checked_cost(w) + rule_cost(w)

    # At the guidance whose settings are mitigation's (copies_reuse.served_guidance), copies takes mitigation's embedded
    # generations: it samples only the controls and the report's top prompts (their figures need the images) there.
    served = served_guidance(cfg)
    reused = 0 if served is None else (sample - min(cfg.report.top_prompts, sample)) * unmitigated(served) + checked_cost(served)
    return {
        "score": args.cascade_per_prompt * n + evaluations(full, cfg.cascade.audit_sample, cfg.score.batch_size),
        "reference": args.reference * full_one,
        "attribute": (attributed * gradient + loo) * (2 if a.null_model else 1) - (loo if a.null_model and not a.null_leave_one_out else 0),
        "mitigate": mitigate,
        "copies": sum(per_guidance(w) for w in guidances(cfg)) - reused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--memorized-percent", type=float, default=1.0)
    parser.add_argument("--cascade-per-prompt", type=float, default=9.56, help="counted, bench/RESULTS.md 'Cascade frontier'")
    parser.add_argument("--reference", type=int, default=500, help="reference prompts (bench/RESULTS.md 'Reference size')")
    parser.add_argument("--words", type=int, default=30, help="words per attributed prompt")
    parser.add_argument("--mitigated-share", type=float, default=1.0,
                        help="strategies' runs as a share of the upper bound (bench/RESULTS.md 'where the sequential rule stops')")
    parser.add_argument("--copy-rule-pairs", type=float, default=0.0,
                        help="prompt-strategy pairs the copies' copy-rate rule adds per guidance past mitigation's")
    parser.add_argument("--copy-rule-prompts", type=float, default=0.0, help="unmitigated prompts it adds per guidance")
    parser.add_argument("--copy-rule-guidances", type=float, nargs="*", default=[1.0],
                        help="the guidances where the unmitigated prompts copy, where the rule runs (testbeds: w = 1)")
    parser.add_argument("--results", default=None, help="write the table into this page (bench/RESULTS.md)")
    parser.add_argument("overrides", nargs="*", help="config overrides (OmegaConf dot-keys)")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    n = args.prompts
    memorized = max(1, round(n * args.memorized_percent / 100))
    costs = stage_costs(cfg, n, memorized, args)
    total = sum(costs.values())
    lines = [HEADING, "",
             f"Command: `PYTHONPATH=$PWD .venv/bin/python bench/audit_cost.py --prompts {n} --memorized-percent "
             f"{args.memorized_percent:g} --mitigated-share {args.mitigated_share:g} --copy-rule-pairs {args.copy_rule_pairs:g} "
             f"--copy-rule-prompts {args.copy_rule_prompts:g} --copy-rule-guidances {' '.join(f'{w:g}' for w in args.copy_rule_guidances)}"
             f"{' ' + ' '.join(args.overrides) if args.overrides else ''}` (arithmetic on the declared "
             f"costs, which tests/test_cost.py holds equal to the counted ones; {cpu_name()}). {n:,} prompts, {memorized:,} "
             f"memorized, the defaults: T={cfg.score.steps}, G={cfg.score.generations}, the cascade at "
             f"{args.cascade_per_prompt} evaluations per prompt plus a {cfg.cascade.audit_sample}-prompt audit sample, "
             f"{args.reference} reference prompts, attribution of {cfg.attribution.max_prompts} prompts at k = "
             f"{cfg.attribution.steps} with the null model, mitigation and copies on a sample of "
             f"{cfg.mitigation.sample_size} with {len(cfg.mitigation.strategies)} strategies and {cfg.mitigation.n_generations} "
             f"generations (strategies run to {args.mitigated_share:.0%} of the whole sample), {cfg.copies.n_controls} copy "
             f"controls at {len(guidances(cfg))} guidances.", "",
             "| stage | denoiser evaluations | per corpus prompt | share |", "|---|---|---|---|"]  # fmt: skip
    for stage, value in costs.items():
        lines.append(f"| {stage} | {value:,.0f} | {value / n:.2f} | {value / total:.0%} |")
    lines.append(f"| **total** | **{total:,.0f}** | **{total / n:.2f}** | |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.results:
        write_results(args.results, HEADING, section)


if __name__ == "__main__":
    main()
