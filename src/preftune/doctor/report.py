"""``report.md`` + ``inspect.json`` + PNG plots of an :class:`~preftune.doctor.checkup.Inspection`.

The report's last section turns the findings into settings; :func:`suggestions` is that list,
also stored in inspect.json under ``suggestions``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.doctor.checkup import DEFAULT_DROP, REASONS, Inspection
from preftune.doctor.images import images_section

SHOW = 10  # rows listed per finding in the markdown (inspect.json lists all)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rows(rows: list[int]) -> str:
    head = ", ".join(str(r) for r in rows[:SHOW])
    return head + (f", ... ({len(rows)} in all)" if len(rows) > SHOW else "") if rows else "none"


def suggestions(s: dict[str, Any]) -> list[str]:
    """Settings and actions the findings call for, one line each."""
    out = _row_suggestions(s["text"]) + _length_suggestions(s)
    tok = s.get("tokens")
    if tok:
        out += _token_suggestions(tok)
    out += _contamination_suggestions(s.get("contamination")) + _flip_suggestions(s.get("flips"))
    return out or ["nothing to fix found."]


def _row_suggestions(t: dict[str, Any]) -> list[str]:
    """Bad rows, duplicates and conflicts, empty replies, ties."""
    out = []
    if t["bad_rows"]["count"]:
        out.append(
            f"{t['bad_rows']['count']} bad rows: training stops at the first; set `skip_bad_rows: true` "
            "or train on the `--write-clean` copy."
        )
    dup, conf = t["exact_duplicates"]["pairs"]["rows"], t["conflicts"]["rows"]
    if dup or conf:
        out.append(
            f"`--write-clean` removes {len(dup)} duplicate and {len(conf)} conflicting rows; if the repeats "
            "are several annotators' judgments, `preftune aggregate` turns them into soft labels instead."
        )
    if t["empty_completions"]["count"]:
        out.append(
            f"{t['empty_completions']['count']} pairs have an empty chosen or rejected reply: an empty "
            "chosen teaches the model to stop at once; add `empty_completion` to `--drop` to remove them."
        )
    if t["soft_labels"]["ties"]:
        out.append(
            f"{t['soft_labels']['ties']} pairs have preference 0.5 (ties): DPO pushes their margin to 0; "
            "drop them unless that is intended."
        )
    return out


def _length_suggestions(s: dict[str, Any]) -> list[str]:
    """A length bias (in tokens when measured, else in characters) worth a length-aware loss."""
    bias = s.get("tokens", {}).get("length_bias") or s["text"]["length_bias"]["chars"]
    if not bias.get("pairs"):
        return []
    if not (abs(bias["cohens_d"]) >= 0.2 or abs(bias["longer_rule_accuracy"] - 0.5) >= 0.1):
        return []
    longer = "longer" if bias["mean_diff"] > 0 else "shorter"
    return [
        f"length bias: 'prefer the longer reply' matches {_pct(bias['longer_rule_accuracy'])} of labels "
        f"(Cohen's d {bias['cohens_d']:+.2f}); DPO will learn 'be {longer}'. "
        "Consider `loss: sigmoid_norm` "
        "(length-normalised) or `loss: simpo`, or length-balanced filtering."
    ]


def _token_suggestions(tok: dict[str, Any]) -> list[str]:
    """Budgets that would truncate less, pairs identical after truncation, the cheapest layout."""
    out = []
    if tok["truncated"]["share"] > 0.05 and tok["suggested_budgets"]:
        b = tok["suggested_budgets"]
        line = (
            f"{_pct(tok['truncated']['share'])} of pairs are truncated; `max_length: {b['max_length']}` "
            f"and `max_prompt_length: {b['max_prompt_length']}` would cut at most 1%"
        )
        limit = tok.get("model_max_length")
        if limit and limit < b["max_length"]:
            line += f", but the model takes at most {limit} tokens: keep max_length <= {limit}"
        out.append(line + ".")
    if tok["dropped_identical"]["count"]:
        out.append(
            f"{tok['dropped_identical']['count']} pairs become identical after truncation and will be "
            "dropped by training (add `truncated_identical` to `--drop` to remove them here)."
        )
    if tok["padding"]:
        best = min(tok["padding"], key=lambda k: tok["padding"][k]["positions_per_pair"])
        out.append(
            f"`layout: {best}` costs the fewest positions per pair "
            f"({tok['padding'][best]['positions_per_pair']:.0f})."
        )
    return out + [f"warning: {w}" for w in tok["warnings"]]


def _contamination_suggestions(c: dict[str, Any] | None) -> list[str]:
    if not (c and (c["train_contaminated"]["count"] or c["eval_contaminated"]["count"])):
        return []
    return [
        f"{c['eval_contaminated']['count']} eval prompts appear in training ({c['ngram']}-gram overlap "
        f">= {c['threshold']:g}); adding `contaminated` to `--drop` removes the "
        f"{c['train_contaminated']['count']} training rows involved."
    ]


def _flip_suggestions(f: dict[str, Any] | None) -> list[str]:
    if not (f and f.get("suggestion")):
        return []
    lo, hi = f["interval"]
    smoothing = f["suggestion"]["loss_params.label_smoothing"]
    return [
        f"estimated label-flip rate {_pct(f['rate'])} (95% CI {_pct(lo)}-{_pct(hi)}): train with "
        f"`loss: robust` and `loss_params.label_smoothing: {smoothing}` "
        "(or `loss: sigmoid` with the same label_smoothing, cDPO), or add `likely_flip` to `--drop`."
    ]


def _markdown(
    s: dict[str, Any], plots: list[str], drop: tuple[str, ...], removal: dict[int, tuple[str, str]]
) -> str:
    lines = _rows_section(s) + _duplicates_section(s["text"]) + _length_section(s)
    tok = s.get("tokens")
    if tok:
        lines += _tokens_section(s["tokenizer"], tok)
    lines += images_section(s.get("images"))
    lines += _contamination_section(s.get("contamination")) + _flips_section(s.get("flips"))
    lines += _removal_section(drop, removal)
    lines += ["", "## Suggested settings", ""] + [f"- {x}" for x in s["suggestions"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _rows_section(s: dict[str, Any]) -> list[str]:
    """The title, the formats of the rows, bad rows, empty and identical replies, soft labels."""
    t = s["text"]
    lines = [
        f"# Preference data report: `{s['data']}`",
        "",
        f"{t['rows']} rows, {t['pairs']} usable pairs, inspected in {s['seconds']:.1f} s.",
        "",
        "## Rows",
        "",
        "| format | rows |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in t["formats"].items()]
    bad = t["bad_rows"]
    reasons = ", ".join(f"{v} x {k}" for k, v in bad["by_reason"].items())
    lines += [
        "",
        f"Bad rows (training rejects them): {bad['count']}" + (f" ({reasons})." if reasons else "."),
    ]
    lines += [f"- {m}" for m in bad["messages"][:SHOW]]
    return lines + [
        "",
        f"Empty completions (chosen or rejected empty: EOS alone): {t['empty_completions']['count']}, rows "
        f"{_rows(t['empty_completions']['rows'])}.",
        "",
        f"chosen == rejected (no gradient; training drops them): {t['chosen_equals_rejected']['count']}, "
        f"rows {_rows(t['chosen_equals_rejected']['rows'])}.",
        "",
        f"Soft labels (preference < 1): {t['soft_labels']['count']}, ties (0.5): {t['soft_labels']['ties']}.",
        "",
    ]


def _duplicates_section(t: dict[str, Any]) -> list[str]:
    """Exact and near duplicates of prompts and pairs, and conflicts."""
    lines = [
        "## Duplicates and conflicts",
        "",
        "| what | groups | repeated rows | share |",
        "|---|---|---|---|",
    ]
    for kind, d in (("exact", t["exact_duplicates"]), ("near", t["near_duplicates"])):
        for part in ("prompts", "pairs"):
            g = d[part]
            lines.append(f"| {kind} duplicate {part} | {g['groups']} | {g['excess']} | {_pct(g['share'])} |")
    return lines + [
        "",
        f"Near duplicates: estimated Jaccard of word {t['near_duplicates']['shingle_words']}-grams >= "
        f"{t['near_duplicates']['threshold']:g} (MinHash). Repeated prompts with different replies are "
        "normal; repeated pairs are not.",
        "",
        f"Conflicts (the same pair with chosen and rejected swapped): {t['conflicts']['groups']} groups, "
        f"rows {_rows(t['conflicts']['rows'])}.",
        "",
    ]


def _length_section(s: dict[str, Any]) -> list[str]:
    """The length bias in characters, and in tokens when measured."""
    lines = [
        "## Length bias",
        "",
        "| unit | chosen longer | 'longer' rule accuracy | mean chosen | mean rejected | mean diff "
        "| Cohen's d | d_z |",
        "|---|---|---|---|---|---|---|---|",
    ]
    units = (("chars", s["text"]["length_bias"]["chars"]), ("tokens", s.get("tokens", {}).get("length_bias")))
    for unit, b in units:
        if b and b.get("pairs"):
            lines.append(
                f"| {unit} | {_pct(b['share_chosen_longer'])} | {_pct(b['longer_rule_accuracy'])} | "
                f"{b['mean_chosen']:.1f} | {b['mean_rejected']:.1f} | {b['mean_diff']:+.1f} | "
                f"{b['cohens_d']:+.3f} | {b['cohens_dz']:+.3f} |"
            )
    return lines


def _tokens_section(tokenizer: str, tok: dict[str, Any]) -> list[str]:
    """Token lengths under the budgets, truncation, and the padding of each layout."""
    b = tok["budgets"]
    lines = [
        "",
        f"## Tokens (`{tokenizer}`; max_length {b['max_length']}, max_prompt_length "
        f"{b['max_prompt_length']}, max_completion_length {b['max_completion_length']})",
        "",
        "| part | mean | median | p90 | p99 | max |",
        "|---|---|---|---|---|---|",
    ]
    for part, q in tok["lengths"].items():
        if q:
            lines.append(
                f"| {part} | {q['mean']:.1f} | {q['median']:.0f} | {q['p90']:.0f} | {q['p99']:.0f} | "
                f"{q['max']:.0f} |"
            )
    tr = tok["truncated"]
    lines += [
        "",
        f"Truncated by the budgets: {tr['count']} pairs ({_pct(tr['share'])}; prompt cut in "
        f"{tr['by_part']['prompt']}, chosen in {tr['by_part']['chosen']}, rejected in "
        f"{tr['by_part']['rejected']}). Identical after truncation (dropped by training): "
        f"{tok['dropped_identical']['count']} (rows {_rows(tok['dropped_identical']['rows'])}).",
        "",
    ]
    if tok["padding"]:
        lines += [
            f"Padding per layout (batch_size {tok['batch_size']}, first "
            f"{next(iter(tok['padding'].values()))['batches']} training batches):",
            "",
            "| layout | padding | positions per pair |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {_pct(v['padding'])} | {v['positions_per_pair']:.1f} |"
            for k, v in tok["padding"].items()
        ]
    return lines


def _contamination_section(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    return [
        "",
        f"## Contamination (eval `{c['eval_file']}`, word {c['ngram']}-grams, overlap >= "
        f"{c['threshold']:g})",
        "",
        f"Eval prompts found in training: {c['eval_contaminated']['count']} of {c['eval_prompts']} "
        f"({_pct(c['eval_contaminated']['share'])}); mean overlap {c['mean_eval_overlap']:.3f}. Training "
        f"rows overlapping eval: {c['train_contaminated']['count']} (rows "
        f"{_rows(c['train_contaminated']['rows'])}).",
    ]


def _flips_section(f: dict[str, Any] | None) -> list[str]:
    """The agreement of the model with the labels, the mirror-mixture flip rate, the flagged rows."""
    if not (f and f.get("scored")):
        return []
    lo, hi = f["interval"]
    cs = f["confident_share"]
    return [
        "",
        "## Likely label flips",
        "",
        f"Scorer: {f['scorer']}.",
        "",
        f"The model agrees with {_pct(f['agreement'])} of {f['scored']} labels. Mirror-mixture fit "
        f"(clean margins ~ N({f['clean_margin']['mean']:.3g}, {f['clean_margin']['sd']:.3g}^2), "
        f"separation {f['separation']:.2f}): estimated flip rate {_pct(f['rate'])} "
        f"(95% CI {_pct(lo)}-{_pct(hi)})"
        + (
            "."
            if f["identifiable"]
            else "; the model separates the labels too weakly for this to mean much (separation < 0.5)."
        ),
        "",
        f"Cross-check: of the {cs['confident']} pairs with |m| > {cs['threshold']:.4g} (the median), "
        f"{cs['negative']} go against the label ({_pct(cs['rate'])}; an upper estimate when the model "
        "errs on clean pairs).",
        "",
        f"Flagged (posterior flip probability >= 0.5): {f['flagged']['count']} rows, most negative "
        f"margin first: {_rows(f['flagged']['rows'])}.",
    ]


def _removal_section(drop: tuple[str, ...], removal: dict[int, tuple[str, str]]) -> list[str]:
    """How many rows ``--write-clean`` removes for each reason."""
    counts: dict[str, int] = {}
    for reason, _ in removal.values():
        counts[reason] = counts.get(reason, 0) + 1
    lines = [
        "",
        f"## What `--write-clean` removes (`--drop {','.join(drop)}`)",
        "",
        "| reason | rows |",
        "|---|---|",
    ]
    return lines + ([f"| {k} | {v} |" for k, v in counts.items()] or ["| (nothing) | 0 |"])


def write_report(
    inspection: Inspection, out_dir: str | Path, drop: tuple[str, ...] = DEFAULT_DROP, plots: bool = True
) -> Path:
    """Write report.md, inspect.json and the plots into ``out_dir``; returns the report's path."""
    from preftune.doctor import plots as p

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = inspection.summary
    removal = inspection.removals(drop)
    s["suggestions"] = suggestions(s)
    drop = tuple(sorted({"bad_row", *drop}, key=REASONS.index))
    s["clean"] = {
        "drop": list(drop),
        "rows": sorted(removal),
        "reasons": [removal[r][0] for r in sorted(removal)],
    }
    drawn: list[str] = []
    if plots and len(inspection.char_lengths):
        drawn.append(
            str(
                p.plot_length_bias(inspection.char_lengths, inspection.token_lengths, out / "length_bias.png")
            )
        )
        if inspection.token_lengths is not None and len(inspection.token_lengths):
            drawn.append(
                str(
                    p.plot_token_lengths(
                        inspection.token_lengths, s["tokens"]["budgets"], out / "token_lengths.png"
                    )
                )
            )
        if inspection.margins is not None and s["flips"].get("scored"):
            drawn.append(str(p.plot_margins(inspection.margins, s["flips"], out / "margins.png")))
    s["plots"] = [Path(x).name for x in drawn]
    (out / "inspect.json").write_text(json.dumps(s) + "\n")
    report = out / "report.md"
    report.write_text(_markdown(s, drawn, drop, removal))
    return report
