"""``qlora bench --plot FILE.png``: GFLOP/s against batch, one line per method and one panel per
weight shape, drawn with matplotlib (the optional ``plot`` extra)."""

from __future__ import annotations

import math

from .report import Cell

__all__ = ["check_matplotlib", "plot_cells"]

# qlora's precisions in strong colours and solid lines, the peers in muted colours and dashes,
# so the eye finds qlora first; a method not listed here gets the next colour of the cycle.
_STYLES = {
    "qlora fp32": ("#1f77b4", "-", "o"),
    "qlora bf16": ("#d62728", "-", "s"),
    "qlora int8": ("#2ca02c", "-", "^"),
    "qlora fp32[scalar]": ("#aec7e8", ":", "."),
    "numpy fp32": ("#444444", "--", "x"),
    "torch fp32": ("#9467bd", "--", "v"),
    "torch bf16": ("#ff7f0e", "--", "D"),
    "bnb matmul_4bit fp32": ("#8c564b", ":", "+"),
    "bnb fused (bf16)": ("#e377c2", "--", "P"),
}


def check_matplotlib() -> None:
    """Fail before a long run, not after it, when ``--plot`` cannot be drawn.

    Raises
    ------
    ValueError
        If matplotlib is not installed (names the extra that installs it).
    """
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ValueError(f"--plot needs matplotlib, which is not installed ({exc}); install "
                         f"it with pip install 'qlora[plot]' or pip install matplotlib") from None


def plot_cells(cells: list[Cell], path: str, title: str) -> None:
    """Draw GFLOP/s (2 * batch * out * in per second) of each cell's fastest call against
    batch for every method. The fastest call, not the median: it is the figure least disturbed
    by other processes, and a shared machine disturbs some libraries far more than others.

    Parameters
    ----------
    cells : list of Cell
        The forward figures of a run; skipped cells (no time) are left out.
    path : str
        Where to write the image; the format follows the suffix (``.png``, ``.svg``, ...).
    title : str
        The figure's title (machine, threads, hot or cold).
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    shapes = list(dict.fromkeys(c.shape for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    ncols = min(len(shapes), 2)
    nrows = math.ceil(len(shapes) / ncols)
    # The legend gets a column of its own at the right, so it never covers a curve.
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols + 2.6, 4.4 * nrows),
                             squeeze=False)
    spare = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    styles = {m: _STYLES.get(m) or (next(spare, "#000000"), "-.", "*") for m in methods}
    for ax, shape in zip(axes.flat, shapes):
        batches = sorted({c.batch for c in cells if c.shape == shape})
        for m in methods:
            pts = sorted((c.batch, c.gflops * c.median_ms / c.best_ms, c.fallback)
                         for c in cells if c.shape == shape and c.method == m
                         and c.gflops is not None and c.best_ms)
            if not pts:
                continue
            colour, line, marker = styles[m]
            strong = m.startswith("qlora") and "[scalar]" not in m
            all_fb = all(f for *_, f in pts)
            label = m + (" (no kernel: ran fp32)" if all_fb else "")
            size = 6 if strong else 5
            ax.plot([b for b, *_ in pts], [g for _, g, _ in pts], line, color=colour,
                    label=label, linewidth=2.2 if strong else 1.4, marker=marker,
                    markersize=size, markerfacecolor="white" if all_fb else colour)
            # Hollow markers where the precision fell back to fp32, filled where it ran.
            for b, g, fb in pts:
                if fb and not all_fb:
                    ax.plot([b], [g], marker=marker, color=colour, markersize=size,
                            markerfacecolor="white", linestyle="none")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch (rows of x)")
        ax.set_ylabel("GFLOP/s of the fastest call (log scale)")
        ax.set_title(f"{shape} (out x in)")
        # Batch 1 runs at tens of GFLOP/s and batch 512 at hundreds: a log axis keeps both
        # readable, and equal ratios are equal distances at every batch.
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.25)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
