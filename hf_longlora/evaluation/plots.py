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


# one look per line, so that lines that coincide (a merged model and its adapter) stay visible: later lines are
# drawn thinner, with smaller markers and another dash pattern, on top of the earlier ones
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def line_styles(count: int) -> list[dict]:
    """Matplotlib line keywords for ``count`` lines: distinct markers and dash patterns, decreasing sizes."""
    styles = []
    for i in range(count):
        shrink = i / max(1, count - 1)  # 0 for the first line, 1 for the last
        style = {
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "markersize": 10.0 - 5.0 * shrink,
            "linewidth": 2.6 - 1.4 * shrink,
            "zorder": 2 + i,
        }
        if i % 2 == 0:  # hollow, filled, hollow, ...: a filled marker on top leaves the ring below it visible
            style["markerfacecolor"] = "none"
        styles.append(style)
    return styles


def perplexity_figure(perplexity: dict[str, dict[int, float]], *, native_context: int | None = None):
    """The figure of :func:`plot_perplexity` (the caller closes it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (label, values), style in zip(perplexity.items(), line_styles(len(perplexity)), strict=True):
        lengths = sorted(values)
        ax.plot(lengths, [values[n] for n in lengths], label=label, **style)
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
    return fig


def plot_perplexity(
    perplexity: dict[str, dict[int, float]], path: str | Path, *, native_context: int | None = None
) -> Path:
    """Perplexity vs context length, one line per model (``{label: {length: perplexity}}``)."""
    return _save(perplexity_figure(perplexity, native_context=native_context), path)


def text_color(rgba) -> str:
    """``"black"`` or ``"white"``, whichever contrasts more with a cell of colour ``rgba`` (WCAG luminance)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # contrast with black (L + 0.05) / 0.05 against white 1.05 / (L + 0.05): equal at L = 0.179
    return "black" if luminance > 0.179 else "white"


def heatmap_figure(
    grid: list[list[float]],
    *,
    columns: list[str],
    rows: list[str],
    xlabel: str,
    ylabel: str,
    title: str,
    row_height: float = 0.45,
):
    """An accuracy heatmap (values in [0, 1], NaN for a missing cell) with each cell's value printed in it, in black
    or white after the cell's colour (:func:`text_color`). The caller closes the figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2.5, row_height * len(rows) + 1.8))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value != value:  # NaN: no cell colour (the axes' white)
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="black")
                continue
            color = text_color(image.cmap(image.norm(value)))
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    return fig


def passkey_heatmap_figure(cells: dict[int, dict[float, float]], *, title: str):
    """The figure of :func:`plot_passkey_heatmap`."""
    lengths = sorted(cells)
    depths = sorted({d for row in cells.values() for d in row})
    return heatmap_figure(
        [[cells[n].get(d, float("nan")) for n in lengths] for d in depths],
        columns=[str(n) for n in lengths],
        rows=[f"{d:.0%}" for d in depths],
        xlabel="prompt length (tokens)",
        ylabel="passkey depth",
        title=title,
    )


def plot_passkey_heatmap(cells: dict[int, dict[float, float]], path: str | Path, *, title: str) -> Path:
    """Passkey accuracy per (depth, length) as a heatmap (``{length: {depth: accuracy}}``)."""
    return _save(passkey_heatmap_figure(cells, title=title), path)


def ruler_heatmap_figure(cells: dict[str, dict[int, float]], *, title: str):
    """The figure of :func:`plot_ruler_heatmap`."""
    tasks = list(cells)
    lengths = sorted({n for row in cells.values() for n in row})
    return heatmap_figure(
        [[cells[t].get(n, float("nan")) for n in lengths] for t in tasks],
        columns=[str(n) for n in lengths],
        rows=tasks,
        xlabel="sequence length (tokens)",
        ylabel="RULER task",
        title=title,
    )


def plot_ruler_heatmap(cells: dict[str, dict[int, float]], path: str | Path, *, title: str) -> Path:
    """RULER accuracy per (task, length) as a heatmap (``{task: {length: accuracy}}``)."""
    return _save(ruler_heatmap_figure(cells, title=title), path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    try:
        fig.savefig(path, dpi=120)
    finally:
        _pyplot().close(fig)
    return path
