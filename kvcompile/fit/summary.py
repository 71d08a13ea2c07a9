"""Human-readable summaries printed at the end of a stage."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from kvcompile.arch import arch_from_description
from kvcompile.memory import (
    baseline_bytes_per_value,
    baseline_note,
    group_bits_per_value,
    memory_table,
)
from kvcompile.metrics import nll_increase
from kvcompile.plan import Plan
from kvcompile.profile.record import Profile
from kvcompile.runtime.slots import format_bytes


def plan_table(plan: Plan) -> Table:
    table = Table(title="per-layer plan", show_lines=False)
    for column in ("layer", "full heads", "budgeted heads", "sinks", "comp", "selected", "window", "C"):
        table.add_column(column, justify="right")
    for i, layer in enumerate(plan.layers):
        layout = layer.layout
        cells = [layout.sinks, layout.compensation, layout.selected, layout.window, layout.capacity] if layout else ["-"] * 5
        name = f"{i}" + (" (sliding)" if layer.sliding else "")
        table.add_row(name, ",".join(map(str, layer.full_heads)) or "-",
                      ",".join(map(str, layer.budgeted_heads)) or "-", *map(str, cells))
    return table


def storage_table(plan: Plan, context: int, head_dim: int, baseline_dtype: str = "bfloat16") -> Table:
    """Each layer's full and budgeted groups: storage (``full`` or ``k8v4g32``) and stored bits
    per value at ``context`` (``memory.group_bits_per_value``: codes, scales and zero points,
    full-precision parts at the baseline dtype's bytes, slot bias and counters)."""
    bytes_per_value = baseline_bytes_per_value(baseline_dtype)
    table = Table(title=f"storage at {context} tokens (bits per value, full precision in "
                        f"{baseline_dtype})")
    for column in ("layer", "full", "bits/value", "budgeted", "bits/value"):
        table.add_column(column, justify="right")
    for i, layer in enumerate(plan.layers):
        row = [f"{i}" + (" (sliding)" if layer.sliding else "")]
        for group, storage, heads in (("full", layer.full_storage, layer.full_heads),
                                      ("budgeted", layer.budget_storage, layer.budgeted_heads)):
            bits = group_bits_per_value(layer, group, context, head_dim, bytes_per_value)
            row += [storage.name if heads else "-", "-" if bits is None else f"{bits:.2f}"]
        table.add_row(*row)
    return table


def memory_rows_table(rows: list[dict[str, Any]], title: str = "KV memory (plan vs uncompressed)",
                      baseline_dtype: str = "bfloat16") -> Table:
    """``memory.memory_table`` rows; the title names the baseline dtype the bytes count at."""
    table = Table(title=f"{title}, values in {baseline_dtype}")
    for column in ("context", "kvcompile", "uncompressed", "ratio" + baseline_note(baseline_dtype)):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["context"]), format_bytes(row["kv_bytes"]),
                      format_bytes(row["uncompressed_bytes"]), f"{row['ratio']:.4f}")
    return table


def choice_table(choice: dict[str, Any]) -> Table:
    """Candidates of the measured choice: loss increases over the uncompressed model."""
    base = choice["uncompressed"]
    table = Table(title=f"measured choice on held-out prompts ({choice['context_tokens']} tokens)")
    for column in ("candidate", "full", "selected", "answer NLL Δ", "text NLL Δ", "text KL", "eligible", "chosen"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in choice["candidates"]:
        text = nll_increase(row["text_nll"], base["text_nll"]) if base["text_nll"] else 0.0
        selected = row.get("selected_fraction")  # absent from profiles before the split was a candidate
        table.add_row(row["name"], str(row["full_heads"]), "" if selected is None else f"{selected:g}",
                      f"{row['answer_nll'] - base['answer_nll']:+.3f}",
                      f"{text:+.2%}", f"{row['text_kl']:.4f}", "yes" if row["eligible"] else "no",
                      "◀" if row["name"] == choice["chosen"] else "")
    return table


def profile_baseline_dtype(profile: Profile) -> str:
    """The baseline dtype the profile's fit counted against (``FitSettings.baseline_dtype``
    where the settings have it; bfloat16, the definition's default, otherwise)."""
    return getattr(profile.settings, "baseline_dtype", "bfloat16")


def print_profile_summary(console: Any, profile: Profile) -> None:
    labels: dict[str, int] = {}
    for head in profile.heads:
        labels[head["label"]] = labels.get(head["label"], 0) + 1
    fit, settings = profile.fit, profile.settings
    # counted now, from the plan, by the one definition (kvcompile.memory) at the profile's
    # baseline dtype: a profile's stored rows may predate it
    dtype = profile_baseline_dtype(profile)
    arch = arch_from_description(profile.model["architecture"])
    rows = memory_table(profile.plan, arch, baseline_bytes_per_value(dtype),
                        extra=(settings.at_context,))
    console.print(plan_table(profile.plan))
    if profile.plan.quantized:  # all-full-precision plans: 16 bits everywhere, nothing to read
        console.print(storage_table(profile.plan, settings.at_context, arch.head_dim, dtype))
    console.print(memory_rows_table(rows, baseline_dtype=dtype))
    console.print(
        "heads: " + ", ".join(f"{n} {label}" for label, n in sorted(labels.items()))
        + f" | full-head rule: {fit['full_heads_rule']}"
    )
    target = next(r for r in rows if r["context"] == settings.at_context)
    console.print(
        f"memory at {settings.at_context} tokens: {target['ratio']:.4f} of uncompressed "
        f"(target {settings.kv_budget:g} of the {settings.baseline_dtype} cache; "
        + (f"{fit['used_bytes']} of {fit['budget_bytes']} B, " if "budget_bytes" in fit else "")
        + f"{fit['used_slots']} slots; storage full {settings.full_storage.name}, "
        f"budgeted {settings.budget_storage.name})"
    )
    sensitivity = profile.sensitivity
    if sensitivity is not None:
        grid = profile.profiling["capacity_grid"]
        at = min(range(len(grid)), key=lambda i: abs(grid[i] - sensitivity["reference_capacity"]))
        losses = sorted(((row[at], layer) for layer, row in enumerate(sensitivity["answer_loss"])), reverse=True)
        top = ", ".join(f"L{layer} {loss:.3f}" for loss, layer in losses[:3] if loss > 0) or "none"
        console.print(
            f"answer loss of one layer cut to {grid[at]} slots ({sensitivity['probes']} probes, "
            f"nats per answer token): {top}"
        )
    if profile.choice is not None:
        console.print(choice_table(profile.choice))
    validation = fit.get("validation")
    if validation:
        console.print(
            f"validation on {validation['context_tokens']} + {validation['scored_tokens']} held-out tokens: "
            f"KL {validation['kl']:.4f} nats/token, NLL {validation['nll_increase']:+.2%} vs uncompressed"
        )
    for note in fit.get("notes", []):
        console.print(f"note: {note}")
