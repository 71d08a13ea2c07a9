"""PNG plots of a profile: where the retrieval heads are, what budgets cost, per-layer capacities."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvcompile.fit.greedy import error_at
from kvcompile.fit.pipeline import stats_from_profile
from kvcompile.profile.record import Profile
from kvcompile.yamlio import atomic_write_bytes


def _save(fig: Figure, path: Path) -> None:
    """Rendered in memory, then written atomically (an interrupt leaves no temporary file)."""
    FigureCanvasAgg(fig)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, png.getvalue())


def _heatmap(values: torch.Tensor, labels: list[list[str]], title: str, path: Path, cmap: str) -> None:
    n_layers, n_kv = values.shape
    fig = Figure(figsize=(max(4.0, 1.2 * n_kv + 2), max(4.0, 0.28 * n_layers + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
    fig.colorbar(image, ax=ax)
    for layer in range(n_layers):
        for head in range(n_kv):
            if labels[layer][head]:
                ax.text(head, layer, labels[layer][head], ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_kv))
    ax.set_title(title)
    _save(fig, path)


def write_profile_plots(profile: Profile, yaml_path: Path) -> list[Path]:
    """Writes ``<stem>-retrieval.png``, ``<stem>-error.png`` and ``<stem>-capacity.png``."""
    yaml_path = Path(yaml_path)
    stem = yaml_path.with_suffix("")
    stats = stats_from_profile(profile)
    plan = profile.plan
    n_layers, n_kv = stats.retrieval.shape
    ctx = profile.settings.at_context
    labels = [["F" if h in plan.layers[layer].full_heads else "" for h in range(n_kv)] for layer in range(n_layers)]
    paths = []

    retrieval_path = Path(f"{stem}-retrieval.png")
    _heatmap(stats.retrieval, labels, "retrieval score (F = kept full)", retrieval_path, "viridis")
    paths.append(retrieval_path)

    error = torch.zeros(n_layers, n_kv)
    for layer, layer_plan in enumerate(plan.layers):
        if layer_plan.layout is None or layer_plan.sliding:
            continue
        for head in layer_plan.budgeted_heads:
            error[layer, head] = error_at(stats, layer, head, layer_plan.layout.capacity, ctx)
    error_path = Path(f"{stem}-error.png")
    _heatmap(error, labels, "e(C) at the fitted capacity (residual-stream error)", error_path, "magma")
    paths.append(error_path)

    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    caps = [layer.layout.capacity if layer.layout else 0 for layer in plan.layers]
    full = [len(layer.full_heads) for layer in plan.layers]
    ax.bar(range(n_layers), caps, color="tab:blue", label="budgeted capacity C (slots)")
    ax.set_xlabel("layer")
    ax.set_ylabel("slots per budgeted head")
    twin = ax.twinx()
    twin.plot(range(n_layers), full, "o", color="tab:red", label="full heads")
    twin.set_ylabel("full KV heads")
    twin.set_ylim(0, n_kv + 0.5)
    ax.set_title(f"per-layer plan ({profile.settings.policy}, {profile.settings.kv_budget:g} at {ctx} tokens)")
    fig.legend(loc="upper right")
    capacity_path = Path(f"{stem}-capacity.png")
    _save(fig, capacity_path)
    paths.append(capacity_path)
    return paths
