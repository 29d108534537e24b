"""The online k-NN curves of several pretraining runs in one picture (the README's figures).

Each run is `LABEL=RUN_DIR`, or `PANEL|LABEL=RUN_DIR` for one panel per PANEL; the x axis is the
share of each run (its steps over its last monitored step), so runs of different lengths line up.
Solid lines: the cls-token feature; dashed: mean-pooled.

    python tools/plot_monitor_runs.py docs/img/monitor_fashion_mnist.png \\
        --title "Fashion-MNIST: online k-NN during pretraining (seed 0)" \\
        "MAE (5 epochs)=runs/fashion_mnist/mae_pretrain" "SimMIM (2 epochs)=runs/fashion_mnist/simmim_pretrain"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mae_scale.train.rundir import RunDir
from mae_scale.visualize import _pyplot

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def knn_curve(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    """(share of the run, cls top-1, mean top-1) at every k-NN evaluation of the run."""
    rows = [r for r in RunDir(run_dir).rows("metrics.jsonl") if r.get("knn_top1_cls") is not None]
    if not rows:
        raise SystemExit(f"error: {run_dir} has no k-NN rows in metrics.jsonl; was monitor.knn_every_steps set?")
    last = max(r["step"] for r in rows) or 1
    return [r["step"] / last for r in rows], [r["knn_top1_cls"] for r in rows], [r["knn_top1_mean"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR or PANEL|LABEL=RUN_DIR")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    panels: dict[str, list[tuple[str, Path]]] = {}
    for spec in args.runs:
        label, _, run_dir = spec.rpartition("=")
        panel, _, label = label.rpartition("|")
        if not label or not run_dir:
            raise SystemExit(f"error: {spec!r} is not LABEL=RUN_DIR")
        panels.setdefault(panel, []).append((label, Path(run_dir)))
    plt = _pyplot()
    width = 6.4 if len(panels) == 1 else 4.8  # per panel
    height = 3.8 if len(panels) == 1 else 4.6
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False, sharey=True)
    for ax, (panel, runs) in zip(axes[0], panels.items()):
        for color, (label, run_dir) in zip(COLORS, runs):
            share, cls, mean = knn_curve(run_dir)
            ax.plot(share, cls, color=color, marker="o", label=f"{label}, cls")
            ax.plot(share, mean, color=color, marker="s", ls="--", alpha=0.7, label=f"{label}, mean-pooled")
        ax.set_title(panel or args.title)
        ax.set_xlabel("share of the pretraining run (0 = initial weights)")
        ax.grid(alpha=0.3)
        if len(panels) == 1:
            ax.legend(fontsize=7, ncol=2 if len(runs) > 2 else 1)
    axes[0, 0].set_ylabel("k-NN top-1 % (10k bank, 2k test queries)")
    if len(panels) > 1:  # one legend below the panels (the runs of each panel are labelled alike)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 4), fontsize=8)
    if args.title and any(panels):
        fig.suptitle(args.title)
    fig.tight_layout(rect=(0, 0.16 if len(panels) > 1 else 0, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
