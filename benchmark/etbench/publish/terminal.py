"""What ``etbench score`` prints: the scorecard's four metric families as terminal tables, and the stage
times of the run."""

from __future__ import annotations

from tabulate import tabulate

from etbench.core.stats import format_estimate_of
from etbench.metrics.chance import at_chance
from etbench.metrics.overlap import format_chance
from etbench.publish.report import CHANCE_LEGEND, format_sizing, with_chance_mark
from etbench.schema import scorecard as sc
from etbench.scoring.pipeline import ScoreRun


def format_scorecard(card: sc.Scorecard) -> str:
    """The four metric families as terminal tables."""
    def est(e: sc.Estimate) -> str:
        return format_estimate_of(e, undefined="undefined")

    parts = [f"scorecard: {card.ft.ref} vs base {card.base.ref}  (config {card.config_hash}, preset "
             f"{card.config.get('preset', {}).get('name', '?')})"]
    acc = {(a.model, a.n_boxes): a.accuracy for a in card.accuracy}
    boxes = sorted({b for _, b in acc})
    parts.append("\n1. full-model accuracy (greedy top-1 over the vocabulary, 95% CI)\n" + tabulate(
        [[b, est(acc[("base", b)]), est(acc[("ft", b)])] for b in boxes], headers=["boxes", "base", "fine-tuned"],
        tablefmt="github"))
    parts.append("\n2. circuit faithfulness (circuit acc / model acc, and MIB's (C - none) / (model - none), 95% CI)\n"
                 + tabulate([[f.circuit, f.model, est(f.circuit_accuracy),
                              with_chance_mark(est(f.faithfulness), at_chance(f.model_accuracy)),
                              with_chance_mark(est(f.faithfulness_mib) if f.faithfulness_mib else "—",
                                               at_chance(f.model_accuracy)),
                              est(f.random_circuit_accuracy)]
                             for f in card.faithfulness],
                            headers=["circuit", "on model", "circuit acc", "faithfulness", "MIB",
                                     "random circuit acc (mean [min, max] over draws)"],
                            tablefmt="github"))
    if card.ceilings:
        parts.append("\n   ceilings of the circuit form (every head kept at its positions) and the floor (no heads)\n"
                     + tabulate([[c.model, est(c.model_accuracy), est(c.form_accuracy), est(c.no_heads_accuracy),
                                  with_chance_mark(est(c.form_faithfulness), at_chance(c.model_accuracy)),
                                  with_chance_mark(est(c.form_faithfulness_mib), at_chance(c.model_accuracy))]
                                 for c in card.ceilings],
                                headers=["model", "model acc", "form acc", "no heads acc", "form faithfulness",
                                         "MIB"], tablefmt="github"))
    if any(at_chance(f.model_accuracy) for f in card.faithfulness):
        parts.append(f"   {CHANCE_LEGEND}")
    sized = [c for c in card.circuits if c.sizing]
    if sized:
        parts.append("\n   circuit size chosen by faithfulness (on held-out sizing prompts)\n" + tabulate(
            [[c.name, sum(len(h) for h in c.heads.values()), format_sizing(c.sizing)] for c in sized],
            headers=["circuit", "nodes", "sizing"], tablefmt="github", disable_numparse=True))
    parts.append("\n3. head overlap, base heads found in the fine-tuned set\n" + tabulate(
        [[o.heads, o.group, est(o.base_in_ft), format_chance(o.chance), est(o.jaccard)] for o in card.overlap],
        headers=["heads", "group", "base in ft", "by chance (p)", "jaccard"], tablefmt="github"))
    if card.dcm:
        parts.append("\n   DCM heads per group x desideratum (test accuracy against the desideratum's target)\n" + tabulate(
            [[d.circuit, d.group, d.desideratum, len(d.selected_heads), est(d.test_accuracy)] for d in card.dcm],
            headers=["circuit", "group", "desideratum", "heads", "test acc"], tablefmt="github"))
    if card.semantics:
        parts.append("\n   semantics check: base DCM heads patched into each model (min/max over repeats)\n" + tabulate(
            [[s.model, s.group, s.desideratum, len(s.heads), est(s.accuracy)] for s in card.semantics],
            headers=["into", "group", "desideratum", "heads", "acc"], tablefmt="github"))
    parts.append("\n4. CMAP: fine-tuned heads patched into the base (gain = patched - base accuracy)\n" + tabulate(
        [[c.heads, c.variant, c.group, est(c.patched_accuracy), est(c.gain), est(c.normalised_gain)] for c in card.cmap],
        headers=["heads", "variant", "group", "patched acc", "gain", "normalised gain"], tablefmt="github"))
    return "\n".join(parts)


def format_timings(run: ScoreRun) -> str:
    lines = [f"  {name}: {secs:.1f} s" + (f", peak {run.peak_rss_mb[name]:.0f} MB" if name in run.peak_rss_mb else "")
             for name, secs in run.timings.items()]
    cached = f"\n  from cache: {', '.join(run.cached_stages)}" if run.cached_stages else ""
    # said apart from the cache: these results were computed by another run (--reuse-stages)
    reused = f"\n  copied from other runs: {', '.join(run.reused_stages)}" if run.reused_stages else ""
    return "stage times:" + "".join("\n" + line for line in lines) + cached + reused
