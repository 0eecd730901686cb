"""The verdicts of docs/results.md as sentences: one clause per finding of ``verdicts``,
one line per claim."""

from __future__ import annotations

from experiments.report import verdicts as v
from experiments.report.render import note_link, seeds_text

TITLES = {
    1: "MC lifts recall and closes part of the gap to attention",
    2: "GRM beats residual / uniform averaging (content-dependent gates matter)",
    3: "SSC keeps most of GRM's gain",
}
# how the findings of claims 1-3 in the older MQAR settings are introduced
OLDER = (
    "Older settings (`mqar`, the no-pressure control, its grid, and `mqar_small_state`; "
    "seeds not paired, no held-out generator seed)"
)


def _paired(p) -> str:
    """'0.412 vs 0.088 (+0.324, higher in 5/5 seeds)'."""
    return (
        f"{p.model_score:.3f} vs {p.reference_score:.3f} ({p.difference:+.3f}, higher in "
        f"{p.better}/{len(p.seeds)} seeds)"
    )


def _verdict(verdict: v.Verdict) -> str:
    if verdict is v.Verdict.INCONCLUSIVE:
        return f"inconclusive (fewer than {v.MIN_PAIRED_SEEDS} paired seeds)"
    return verdict.value


def capacity_finding(item) -> str:
    """One finding of ``verdicts.capacity_claims`` as the clause of its claim's line."""
    if isinstance(item, v.CapacityLift):
        p = item.lift
        which = "the MC cell" if item.candidates == 1 else f"best of {item.candidates} MC cells"
        text = f"{which} ({p.model}) vs {p.reference}: {_paired(p)}"
        if item.transformer is not None:
            text += f", {item.transformer_model} {item.transformer:.3f}"
            if item.closed is not None:
                text += (
                    " (MC passes Transformer++)"
                    if item.closed > 1
                    else f" (closes {item.closed:.0%} of the gap)"
                )
        else:
            text += " (Transformer++ not run here: the lift is judged, the gap to attention is not)"
        if item.verdict is v.Verdict.NOT_TESTABLE:
            return text + ": not testable (no model, Transformer++ included, left chance)"
        return f"{text}: {_verdict(item.verdict)}"
    if isinstance(item, v.CapacityGate):
        gain = item.gain
        return f"{gain.model} vs {gain.reference}: {_paired(gain)}: {_verdict(item.verdict)}"
    if isinstance(item, v.CapacityKeep):
        base = item.grm.reference
        if item.kept is None:
            nothing = f"{item.grm.model} gains nothing over {base} ({_paired(item.grm)})"
            return f"{nothing}: {_verdict(item.verdict)}"
        share = "ssc gains more than grm" if item.kept > 1 else f"keeps {item.kept:.0%}"
        return (
            f"gain over {base}: {item.ssc.model} {item.ssc.difference:+.3f} (higher in "
            f"{item.ssc.better}/{len(item.ssc.seeds)} seeds), {item.grm.model} "
            f"{item.grm.difference:+.3f} ({share}): {_verdict(item.verdict)}"
        )
    raise TypeError(f"no rendering for {type(item).__name__}")


def _where(item) -> str:
    return f"{item.base} {item.view} ({seeds_text(item.seeds)})"


def finding(item) -> str:
    """One finding of ``verdicts`` as the clause of its claim's line."""
    if isinstance(item, v.NoLearner):
        if item.view is None:
            return f"{item.base}: no {item.base} model left chance, not testable"
        return f"{_where(item)}: no {item.base} model left chance: not testable"
    if isinstance(item, v.Lift):
        gap = "" if item.transformer is None else f", Transformer++ {item.transformer:.3f}"
        verdict = item.verdict.value
        if item.closed is not None:
            verdict += f" (lifts recall, closes {item.closed:.0%} of the gap)"
        easy = (
            f" (the base already recalls {v.EASY:.0%} or more: this setting does not strain "
            "its fixed-size state)"
            if item.easy
            else ""
        )
        return (
            f"{_where(item)}: base {item.base_score:.3f}, best MC ({item.best}) "
            f"{item.best_score:.3f}{gap}: {verdict}{easy}"
        )
    if isinstance(item, v.GateGain):
        return (
            f"{_where(item)}: grm {item.grm:.3f} vs residual {item.residual:.3f}: "
            f"{item.verdict.value}"
        )
    if isinstance(item, v.SparseKeep):
        if item.kept is None:
            return f"{_where(item)}: grm gains nothing over the base: not testable"
        share = "ssc beats grm" if item.kept > 1 else f"ssc keeps {item.kept:.0%} of grm's gain"
        return (
            f"{_where(item)}: ssc {item.ssc:.3f} vs grm {item.grm:.3f}, base "
            f"{item.base_score:.3f} ({share}): {item.verdict.value}"
        )
    if isinstance(item, v.Extrapolation):
        parts = []
        if item.trained:
            model, score, verdict = item.trained
            parts.append(f"{model} {score:.3f}: {verdict.value}")
        if item.post_training:
            score, verdict = item.post_training
            parts.append(f"post-training MC {score:.3f}: {verdict.value}")
        return (
            f"{item.base} at {item.length} tokens, {item.pairs} pairs (`mqar`, the no-pressure "
            f"control, trained at 64 tokens, 8 pairs; {seeds_text(item.seeds)}): base "
            f"{item.base_score:.3f}, " + ", ".join(parts)
        )
    if isinstance(item, v.NIAHFinding):
        return _niah_finding(item)
    raise TypeError(f"no rendering for {type(item).__name__}")


def _niah_finding(f: v.NIAHFinding) -> str:
    seeds, first, last = seeds_text(f.seeds), f.first, f.last
    score = {m: (a, b) for m, a, b in f.scores}
    if f.verdict is None:  # the base learned: MC against it at the longest length
        parts = [
            f"{'post-training MC' if m.startswith(f.base + ', ') else m} {s:.3f}: {verdict.value}"
            for m, s, verdict in f.comparisons
        ]
        return (
            f"S-NIAH {f.metric} at {last} tokens (trained at {first}; {seeds}): base "
            f"{score[f.base][1]:.3f}, " + ", ".join(parts)
        )
    if f.verdict is v.Verdict.INCONCLUSIVE:
        return (
            f"S-NIAH inconclusive ({seeds}): no model (Transformer++ included) learned the "
            f"retrieval at its training length within the budget (no {f.metric} of "
            f"{f.threshold} or more)"
        )
    shown = ", ".join(
        f"{m} {score[m][0]:.3f} at {first} and {score[m][1]:.3f} at {last} tokens"
        for m in f.learned
    )
    if f.verdict is v.Verdict.PARTLY:
        others = ", ".join(f"{m} {a:.3f} and {b:.3f}" for m, a, b in f.scores if m not in f.learned)
        return (
            f"S-NIAH ({seeds}), {f.metric} (at least {f.threshold} at {first} tokens counts as "
            f"learned): {shown}; not learned: {others}: partly reproduced (Memory Caching "
            f"learned the retrieval that {f.base} did not, and keeps up to {f.kept:.0%} of it "
            f"at {last} tokens; with no base that learned, its extrapolation cannot be set "
            "against the base's)"
        )
    why = (
        f"no recurrent model reached {f.threshold} (best {f.best}: {score[f.best][0]:.3f} at "
        f"{first} and {score[f.best][1]:.3f} at {last} tokens"
    )
    if f.best != f.base:
        why += f"; {f.base} {score[f.base][0]:.3f} and {score[f.base][1]:.3f}"
    return (
        f"S-NIAH not testable ({seeds}): by {f.metric} (at least {f.threshold} at {first} "
        f"tokens) only {shown} learned the retrieval; {why})"
    )


def verdict_section(capacity, claims_1_3, claim_4, claim_5, lm, uuid=None) -> list[str]:
    """The verdicts' lines.

    Args:
        capacity: ``verdicts.capacity_claims`` (claims 1-3 on mqar_capacity, judged first).
        claims_1_3: ``verdicts.claims_1_to_3`` on the older MQAR settings.
        claim_4, claim_5: findings of claims 4 and 5.
        lm: ``verdicts.lm_claim``.
        uuid: ``verdicts.capacity_claims`` on niah_uuid's answer tokens (None: not run).
    """
    lines = [
        "## Verdicts on the paper's claims",
        "",
        "Claims 1-3 are judged on `mqar_capacity` first (held-out accuracy, seeds paired; "
        f"reproduced: a mean gain above the margin ({v.LIFT_MARGIN} for claim 1, "
        f"{v.GATE_MARGIN} for claim 2) that holds in at least {float(v.SEED_SHARE):.0%} of "
        "the seeds; partly: a mean gain that holds in fewer; claim 3: ssc's mean gain over the "
        "base at least half of grm's). The same rules judge them on `niah_uuid`, on answer-token "
        f"accuracy within the training length (a model below {v.NIAH_TOKENS_LEARNED} there has "
        "not learned the copy).",
        "",
    ]
    for claim, items in claims_1_3.items():
        found = capacity.get(claim, [])
        text = "mqar_capacity: " + (
            "; ".join(map(capacity_finding, found)) if found else "not measured yet"
        )
        if uuid and uuid.get(claim):
            text += ". niah_uuid (answer tokens): " + "; ".join(map(capacity_finding, uuid[claim]))
        if items:
            text += f". {OLDER}: " + "; ".join(map(finding, items))
        lines.append(f"- **{claim}. {TITLES[claim]}**: {text}.")
    text = "; ".join(map(finding, claim_4)) + "."
    if not claim_4:
        text = "not measured yet (MQAR and S-NIAH sweeps)."
    lines.append(f"- **4. MC helps length extrapolation, also post-training**: {text}")
    title = "- **5. MC training throughput lies between the RNN's and the Transformer's**: "
    if claim_5 is None:
        lines.append(title + "not measured yet (training-throughput benchmark).")
    else:
        items = "; ".join(
            f"{name} {speed:,.0f} (base {base:,.0f})" + ("" if between else " — outside")
            for name, speed, base, between in claim_5.items
        )
        lines.append(
            title + f"at T={claim_5.length} tokens/s, Transformer++ {claim_5.transformer:,.0f}; "
            f"{items}: {claim_5.verdict.value}."
        )
    lines += [f"- **LM. MC lowers the validation loss of language models**: {_lm(*lm)}", ""]
    lines += [note_link("reading", "What these verdicts mean, as of the last sweep"), ""]
    return lines


def _lm(families: list, transformer) -> str:
    """The LM claim's line: the numbers, then the verdict (at short blocks: not testable)."""
    if not families:
        return "not measured yet (LM sweep)."
    items = [
        f"{f.base} {f.base_bits:.3f} bits/byte, "
        + ", ".join(f"{m} {b:.3f} ({b - f.base_bits:+.3f})" for m, b in f.variants)
        + f" ({seeds_text(f.seeds)})"
        + ("" if f.verdict is v.Verdict.NOT_TESTABLE else f": {f.verdict.value}")
        for f in families
    ]
    if transformer:
        items.append(f"Transformer++ {transformer[0]:.3f} ({seeds_text(transformer[1])})")
    text = "; ".join(items)
    short = [f for f in families if f.verdict is v.Verdict.NOT_TESTABLE]
    if short:
        f = short[0]
        text += (
            f". Not testable at this scale: blocks of {f.block} tokens, in which the last "
            f"token reads at most {f.caches} caches, leave a long-context gain no room to show "
            f"(it needs blocks of at least {v.LM_MIN_BLOCK} tokens and the loss by position), "
            "so these differences say nothing for or against the claim"
        )
    return text + "."
