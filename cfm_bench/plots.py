"""PNG plots of `cfm bench split` results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KIND_STYLE = {"local": dict(color="black", ls="-", marker="o"),
              "center-only": dict(color="tab:red", ls=":", marker="s")}


def plot_all(result: dict, out_dir: Path) -> list[Path]:
    return [latency_vs_rtt(result, out_dir / "latency_vs_rtt.png"),
            best_config_map(result, out_dir / "best_config.png"),
            planner_vs_measured(result, out_dir / "planner_vs_measured.png")]


def _configs(cells: list[dict]) -> list[str]:
    """Every configuration measured, local first and center-only last."""
    names = dict.fromkeys(r["config"] for c in cells for r in c["runs"])
    return sorted(names, key=lambda n: (n != "local", n == "center-only", n))


def _style(name: str, splits: list[str]) -> dict:
    """One colour per split, solid for fp32 and dashed for fp16."""
    if name in KIND_STYLE:
        return KIND_STYLE[name]
    split = name.rsplit(" ", 1)[0]
    return dict(color=plt.cm.tab10(splits.index(split) % 10), ls="--" if name.endswith("fp16") else "-",
                marker="^" if name.endswith("fp16") else "v")


def latency_vs_rtt(result: dict, path: Path) -> Path:
    cells, rates = result["cells"], result["settings"]["rates_mbit"]
    fig, axes = plt.subplots(2, len(rates), figsize=(5.2 * len(rates), 8), squeeze=False, sharex=True)
    for col, rate in enumerate(rates):
        row = sorted((c for c in cells if c["rate_mbit"] == rate), key=lambda c: c["rtt_ms"])
        rtts = [c["rtt_ms"] for c in row]
        names = _configs(cells)
        splits = list(dict.fromkeys(n.rsplit(" ", 1)[0] for n in names if n.startswith("split")))
        for name in names:
            for ax, key in ((axes[0][col], "median_ms"), (axes[1][col], "ttft_ms")):
                ys = [next((r[key] for r in c["runs"] if r["config"] == name), np.nan) for c in row]
                ax.plot(rtts, ys, label=name, **_style(name, splits))
        for k, v in enumerate(v for v in result.get("local_variants", []) if "median_ms" in v):
            axes[0][col].axhline(v["median_ms"], color="grey", ls=(0, (1, 2 + k)), lw=1.5,
                                 label=f"{v['config']} (measured once)")
        chosen = [next(r["median_ms"] for r in c["runs"] if r["config"] == c["planner"]["config"]) for c in row]
        axes[0][col].scatter(rtts, chosen, s=220, facecolors="none", edgecolors="tab:green", linewidths=2,
                             label="planner's choice", zorder=5)
        axes[0][col].set_title(f"{rate:g} Mbit/s: per-token decode (median)")
        axes[1][col].set_title(f"{rate:g} Mbit/s: time to first token")
        axes[1][col].set_xlabel("emulated RTT (ms)")
    axes[0][0].set_ylabel("ms per token")
    axes[1][0].set_ylabel("ms")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def best_config_map(result: dict, path: Path) -> Path:
    cells, s = result["cells"], result["settings"]
    rtts, rates = list(s["rtts_ms"]), list(s["rates_mbit"])
    names = _configs(cells)
    grid = np.full((len(rates), len(rtts)), np.nan)
    fig, ax = plt.subplots(figsize=(2.3 * len(rtts) + 2, 1.6 * len(rates) + 2))
    for c in cells:
        i, j = rates.index(c["rate_mbit"]), rtts.index(c["rtt_ms"])
        grid[i, j] = names.index(c["best_private"])
        mark = "✓" if c["planner_within_10pct"] else "✗"
        center_only = next(r["median_ms"] for r in c["runs"] if r["kind"] == "center-only")
        ax.text(j, i, f"best: {c['best_private']}\n{c['best_private_ms']:.0f} ms/tok\n"
                      f"planner: {c['planner']['config']}\n{c['planner_measured_ms']:.0f} ms {mark}\n"
                      f"(center-only {center_only:.0f} ms)", ha="center", va="center", fontsize=7)
    cmap = plt.get_cmap("Pastel1", max(len(names), 2))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
    ax.set_xticks(range(len(rtts)), [f"{r:g}" for r in rtts])
    ax.set_yticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_xlabel("emulated RTT (ms)")
    ax.set_ylabel("bandwidth (Mbit/s)")
    ax.set_title("fastest configuration that keeps text on the edge (colour, median ms per token);\n"
                 "planner's choice, ✓ = within 10% of it; center-only (token ids sent) for reference", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def planner_vs_measured(result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 6))
    runs = [(r, c) for c in result["cells"] for r in c["runs"] if r.get("predicted_ms")]
    for kind, color in (("local", "black"), ("split", "tab:blue")):
        pts = [(r["predicted_ms"], r["median_ms"]) for r, _ in runs if r["kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts), s=18, color=color, label=kind, alpha=0.7)
    chosen = [(r["predicted_ms"], r["median_ms"]) for r, c in runs if r["config"] == c["planner"]["config"]]
    if chosen:
        ax.scatter(*zip(*chosen), s=90, facecolors="none", edgecolors="tab:green", label="planner's choice")
    top = max([max(r["predicted_ms"], r["median_ms"]) for r, _ in runs] + [1]) * 1.1
    x = np.linspace(0, top, 50)
    ax.plot(x, x, color="grey", lw=1, label="measured = predicted")
    ax.fill_between(x, x / 1.25, x / 0.75, color="grey", alpha=0.15, label="within 25%")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("planner's predicted ms per token")
    ax.set_ylabel("measured ms per token (median)")
    sm = result["summary"]
    ax.set_title(f"planner within 25%: {sm['planner_within_25pct']}/{sm['planner_predictions']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _title(result: dict) -> str:
    e = result["environment"]
    return (f"edge {e['edge_threads']} thread(s), center {e['center_threads']} "
            f"(serving {e['center_span'][0]}:{e['center_span'][1]}), load average {e['loadavg_start'][0]:.1f};\n"
            f"{result['settings']['prompt_tokens']} prompt + {result['settings']['decode_tokens']} "
            "decode tokens per run")
