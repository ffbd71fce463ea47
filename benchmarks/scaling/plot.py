"""The scaling sweep's figure: six log-log panels, time and memory against T and against N, CALM's
update against seen tasks, CALM's phases against the pool size; fitted exponents in the legends."""
from __future__ import annotations

from pathlib import Path

from .fits import sweep_rows
from .workload import DATA_FREE, LABELS, METHODS

COLORS = {"calm": "C0", "task_arithmetic": "C1", "ties": "C2", "consensus": "C3"}


class Panels:
    """The payload's rows and fits, and the helpers every panel draws with."""

    def __init__(self, payload: dict, plt, ticker):
        self.rows, self.fits, self.grid = payload["rows"], payload["fits"], payload["grid"]
        self.plt, self.ticker = plt, ticker
        self.T_values = sorted({r["T"] for r in sweep_rows(self.rows, "tasks")}) or [2]

    def exponent(self, name, x):
        f = self.fits.get(name)
        return f" (∝ {x}^{f['exponents'][x]:.2f})" if f else ""

    def series(self, a, sweep, x, y, method, marker="o", **kw):
        pts = sorted(sweep_rows(self.rows, sweep, method), key=lambda r: r[x])
        if pts:
            a.plot([r[x] for r in pts], [y(r) for r in pts], marker=marker, color=COLORS[method], **kw)
        return pts

    def where(self, sweep):
        g = self.grid.get(sweep, {})
        return ", ".join(f"{k} {v[0]}" for k, v in (("tower", g.get("towers")), ("T =", g.get("tasks")),
                                                      ("pool", g.get("pools"))) if v and len(v) == 1)

    def plain(self, a, axis, ticks=None, fmt=None):  # readable tick labels on a log axis
        t = self.ticker
        target = a.xaxis if axis == "x" else a.yaxis
        if ticks:
            target.set_major_locator(t.FixedLocator(sorted(ticks)))
        target.set_major_formatter(t.FuncFormatter(fmt) if fmt else t.ScalarFormatter())
        target.set_minor_formatter(t.NullFormatter())

    def time_vs_T(self, a):
        for m in METHODS:
            self.series(a, "tasks", "T", lambda r: r["wall_s"], m,
                        label=f"{LABELS[m]}: whole merge" + self.exponent(f"{m}: wall time vs T", "T"))
        self.series(a, "tasks", "T", lambda r: r["per_update"]["total_s"], "calm", "s", ls="--",
                    label="CALM: one update (mean)")
        self.series(a, "tasks", "T", lambda r: r["phases"].get("pseudo_labels_s", 0), "calm", "^", ls=":",
                    label="CALM: pseudo-labels" + self.exponent("calm: pseudo-labels time vs T", "T"))
        a.set(xscale="log", yscale="log", xlabel="tasks T", ylabel="seconds", title=f"time vs T ({self.where('tasks')})")
        self.plain(a, "x", self.T_values)

    def memory_vs_T(self, a):
        pts = []
        for m in DATA_FREE:
            pts = self.series(a, "tasks", "T", lambda r: r["peak_rss_above_baseline_x_P"], m,
                              label=f"{LABELS[m]}: peak RSS")
        if pts:
            a.plot([r["T"] for r in pts], [r["reference_x_P"] for r in pts], color="gray", ls="--",
                   label="1 model + T × largest parameter")
            a.plot([r["T"] for r in pts], [r["T"] for r in pts], color="black", ls=":", label="T models")
        self.series(a, "tasks", "T", lambda r: r["peak_rss_above_baseline_x_P"], "calm", "s", ls="--",
                    label="CALM: peak RSS (grads + activations + extra)")
        self.series(a, "tasks", "T", lambda r: r["extra_x_P"], "calm", label="CALM: extra (peak − probe)")
        self.series(a, "tasks", "T", lambda r: r["extra_less_masks_x_P"], "calm", "v", ls=":",
                    label="CALM: extra − packed masks")
        a.set(xscale="log", yscale="log", xlabel="tasks T", ylabel="× P (merged parameter bytes)",
              title=f"peak memory above baseline vs T ({self.where('tasks')})")
        self.plain(a, "x", self.T_values)
        self.plain(a, "y", [1, 1.5, 2, 3, 4, 6, 8, 12, 16])

    def update_vs_seen(self, a):
        calm_t = sorted(sweep_rows(self.rows, "tasks", "calm"), key=lambda r: r["T"])
        for i, r in enumerate(calm_t):
            a.plot([x["seen"] for x in r["steps"]], [x["update_s"] for x in r["steps"]], marker="o",
                   color=self.plt.cm.viridis(i / max(len(calm_t) - 1, 1)), label=f"T = {r['T']}")
        f = self.fits.get("calm: update per step's update vs seen, T (every step of the T sweep)")
        a.set(xscale="log", yscale="log", xlabel="seen tasks in the step",
              ylabel="seconds per update (fastest of the step)",
              title="CALM: time per update vs seen tasks" + (f"\nfit ∝ seen^{f['exponents']['seen']:.2f} · T^"
                                                             f"{f['exponents']['T']:+.2f}" if f else ""))
        self.plain(a, "x", [2, 4, 8, 16])

    def time_vs_N(self, a):
        for m in METHODS:
            self.series(a, "size", "N", lambda r: r["wall_s"], m,
                        label=f"{LABELS[m]}: whole merge" + self.exponent(f"{m}: wall time vs N", "N"))
        self.series(a, "size", "N", lambda r: r["per_update"]["elementwise_s"], "calm", "s", ls="--",
                    label="CALM: element-wise per update" + self.exponent("calm: element-wise per update vs N", "N"))
        a.set(xscale="log", yscale="log", xlabel="merged parameters N", ylabel="seconds",
              title=f"time vs model size ({self.where('size')})")

    def memory_vs_N(self, a):
        for m in METHODS:
            self.series(a, "size", "N", lambda r: r["peak_rss_above_baseline_x_P"], m, label=f"{LABELS[m]}: peak RSS")
        self.series(a, "size", "N", lambda r: r["extra_x_P"], "calm", "s", ls="--", label="CALM: extra (peak − probe)")
        a.set(xscale="log", xlabel="merged parameters N", ylabel="× P",
              title=f"peak memory above baseline vs model size ({self.where('size')})")
        a.set_ylim(bottom=0)

    def time_vs_pool(self, a):
        self.series(a, "pool", "pool", lambda r: r["phases"].get("pseudo_labels_s", 0), "calm",
                    label="CALM: pseudo-labels" + self.exponent("calm: pseudo-labels time vs pool", "pool"))
        self.series(a, "pool", "pool", lambda r: r["per_update"]["total_s"], "calm", "s", ls="--",
                    label="CALM: one update (mean)" + self.exponent("calm: per update vs pool", "pool"))
        self.series(a, "pool", "pool", lambda r: r["wall_s"], "calm", "^", ls=":", label="CALM: whole merge")
        a.set(xscale="log", yscale="log", xlabel="unlabeled images per task", ylabel="seconds",
              title=f"CALM: time vs pool size ({self.where('pool')})")
        self.plain(a, "x", sorted({r["pool"] for r in sweep_rows(self.rows, "pool")}) or [1])


def plot(payload: dict, path: Path) -> bool:
    """The six panels as a PNG at path; False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return False
    panels = Panels(payload, plt, ticker)
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    for a, draw in ((ax[0, 0], panels.time_vs_T), (ax[0, 1], panels.memory_vs_T), (ax[0, 2], panels.update_vs_seen),
                    (ax[1, 0], panels.time_vs_N), (ax[1, 1], panels.memory_vs_N), (ax[1, 2], panels.time_vs_pool)):
        draw(a)
    millions = sorted({r["N"] for r in sweep_rows(panels.rows, "size")}) or [1e6]
    for a in (ax[1, 0], ax[1, 1]):
        panels.plain(a, "x", millions, lambda x, _: f"{x / 1e6:.1f} M")
    for a in (ax[0, 0], ax[0, 2], ax[1, 0], ax[1, 2]):
        panels.plain(a, "y", fmt=lambda y, _: f"{y:g}")
    for a in ax.flat:
        a.grid(True, which="both", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    m = payload["metadata"]
    fig.suptitle(f"calm_fast scaling on {m['device']}, {m['torch_threads']} thread(s) per point "
                 f"(load average {m['loadavg_start'][0]:.1f}: times are noisy, memory is not)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
