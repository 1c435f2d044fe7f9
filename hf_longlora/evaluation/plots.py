"""PNG plots of evaluation results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'hf-longlora[eval]'") from exc
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(
    perplexity: dict[str, dict[int, float]], path: str | Path, *, native_context: int | None = None
) -> Path:
    """Perplexity vs context length, one line per model (``{label: {length: perplexity}}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, values in perplexity.items():
        lengths = sorted(values)
        ax.plot(lengths, [values[n] for n in lengths], marker="o", label=label)
    if native_context is not None:
        ax.axvline(native_context, color="grey", linestyle=":", label=f"native context ({native_context})")
    ax.set_xscale("log", base=2)
    all_lengths = sorted({n for values in perplexity.values() for n in values})
    ax.set_xticks(all_lengths, [str(n) for n in all_lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (full attention)")
    ax.set_title("Perplexity vs context length")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_passkey_heatmap(cells: dict[int, dict[float, float]], path: str | Path, *, title: str) -> Path:
    """Passkey accuracy per (depth, length) as a heatmap (``{length: {depth: accuracy}}``)."""
    plt = _pyplot()
    lengths = sorted(cells)
    depths = sorted({d for row in cells.values() for d in row})
    grid = [[cells[n].get(d, float("nan")) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.45 * len(depths) + 1.8))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
