"""Speculative decoding: local decode and split decode over emulated links, with and without speculation.

Tasks (`cfm_bench/data/speculative_tasks.json`, written for the project): drafting-friendly ones (correct a
paragraph, edit a function, answer from a passage, rewrite a list) and open chat. Every run is greedy, and the
text with speculation is checked against the text without it, token for token.

- local: cfm int4 without speculation, cfm int4 with `--speculate auto`, and llama-cpp-python on the same
  Q4_1 file, alternating every `--chunk` decode tokens with an untimed pause before each turn (the house method
  of bench_decode.py); tok/s per task and the median of the paired per-chunk ratios.
- split: the edge (this process) and a real center (its own process, layers 2:28) through the link emulator at
  each RTT of `--rtts`; off, auto and edge-only drafting alternating in chunks as above; tok/s, tokens per round
  trip, acceptance; and the planner's choice at each RTT with and without speculation.
- fp32: on the `modules` backend a chunk of positions rounds differently from single steps; how often greedy
  text with speculation differs there (first differing token per task).

    python benchmarks/bench_speculative.py [--threads 2] [--decode 64] [--chunk 16] [--rtts 0,10,50,100]
        [--split-decode 48] [--parts local,split,fp32]

Saves benchmarks/results/speculative.json and speculative.png. The machine is shared: the JSON records the load
average before and after each part; absolute speeds move with it, paired ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, median, save  # noqa: E402
from bench_decode import LlamaCppSteps  # noqa: E402

import cfm_runtime  # noqa: E402
from cfm_bench.center_service import CenterProcess  # noqa: E402
from cfm_bench.link import LinkEmulator, LinkSpec  # noqa: E402
from cfm_runtime import CenterOptions, LoadOptions, RunOptions  # noqa: E402
from cfm_runtime.tokenizer import quiet_stderr  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "cfm_bench" / "data" / "speculative_tasks.json"
SPAN = (2, 28)
PAUSE = 0.1  # untimed, before each turn: the previous runtime's spinning workers stop


def load_tasks() -> list[dict]:
    return json.loads(TASKS.read_text())["tasks"]


class StreamRun:
    """One greedy answer of a cfm generator, consumed a few tokens at a time (so runtimes can alternate)."""

    def __init__(self, model, generator, messages, max_tokens: int):
        self.model, self.generator = model, generator
        self.it = model.stream(messages, generator=generator, temperature=0, max_tokens=max_tokens)
        self.tokens, self.stats, self.done = [], None, False

    def prefill(self) -> float:
        """Runs up to the first token (the prompt); -> seconds."""
        t0 = time.perf_counter()
        self._pull(1)
        return time.perf_counter() - t0

    def decode(self, n: int) -> tuple[float, int]:
        """-> (seconds, tokens) for the next n tokens (fewer at the end of the answer)."""
        before = len(self.tokens)
        t0 = time.perf_counter()
        self._pull(n)
        return time.perf_counter() - t0, len(self.tokens) - before

    def _pull(self, n: int) -> None:
        want = len(self.tokens) + n
        while not self.done and len(self.tokens) < want:
            chunk = next(self.it, None)
            if chunk is None:
                self.done = True
                break
            self.stats = chunk.stats
            if chunk.token is not None:
                self.tokens.append(chunk.token)

    def finish(self) -> None:
        while not self.done:
            self._pull(1 << 20)


class LlamaRun:
    """llama-cpp-python, greedy, one token per eval (as a chat UI streams), on the same chat prompt ids."""

    def __init__(self, llm, ids: list[int], max_tokens: int):
        self.steps, self.ids, self.max_tokens = LlamaCppSteps(llm), ids, max_tokens
        self.count, self.done = 0, False  # tokens generated (speed only: its text is not compared)

    def prefill(self) -> float:
        dt = self.steps.prefill(self.ids)
        self.count = 1
        return dt

    def decode(self, n: int) -> tuple[float, int]:
        n = min(n, self.max_tokens - self.count)
        if n <= 0:
            self.done = True
            return 0.0, 0
        dt = self.steps.decode(n)
        self.count += n
        self.done = self.count >= self.max_tokens
        return dt, n

    def finish(self) -> None:
        pass


def alternate(runs: dict, chunk: int) -> dict:
    """Prefill every run, then decode `chunk` tokens of each in turn (the order rotating) until all are done.
    -> {name: {"prompt_s", "chunks": [(seconds, tokens)], "decode_tps"}}."""
    out = {}
    for name, r in runs.items():
        time.sleep(PAUSE)
        out[name] = {"prompt_s": r.prefill(), "chunks": []}
    order = list(runs)
    while not all(r.done for r in runs.values()):
        order = order[1:] + order[:1]  # rotate: no runtime always follows the same one
        for name in order:
            r = runs[name]
            if r.done:
                continue
            time.sleep(PAUSE)
            s, n = r.decode(chunk)
            if n:
                out[name]["chunks"].append((s, n))
    for r in runs.values():
        r.finish()
    for o in out.values():
        secs, toks = sum(s for s, _ in o["chunks"]), sum(n for _, n in o["chunks"])
        o["decode_tokens"], o["decode_s"] = toks, secs
        o["decode_tps"] = toks / secs if secs > 0 else 0.0
    return out


def chunk_ratios(base: list, other: list) -> list[float]:
    """Paired per-chunk speed ratios other/base (chunk i of each ran back to back)."""
    return [(no / so) / (nb / sb) for (sb, nb), (so, no) in zip(base, other) if sb > 0 and so > 0 and nb and no]


def spec_report(run: StreamRun) -> dict:
    r = dict(run.stats.extra.get("speculative") or {})
    return r


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- local


def part_local(args, tasks: list[dict]) -> dict:
    from cfm_runtime.reference import open_llama

    model = cfm_runtime.load_model(args.model, LoadOptions(threads=args.threads))
    with quiet_stderr():
        llm = open_llama(model.path, n_ctx=2048, n_batch=512, n_threads=args.threads,
                         n_threads_batch=args.threads, verbose=False)
    gens = {"cfm_off": model.new_generator(RunOptions(speculate="off")),
            "cfm_auto": model.new_generator(RunOptions(speculate="auto"))}
    warm = tasks[0]["messages"]
    alternate({n: StreamRun(model, g, warm, 8) for n, g in gens.items()}, 4)  # warm-up: kernels, caches
    results = []
    for task in [t for _ in range(args.reps) for t in tasks]:
        ids = model.encode_prompt(task["messages"])
        runs = {"llama_cpp": LlamaRun(llm, ids, args.decode),
                **{n: StreamRun(model, g, task["messages"], args.decode) for n, g in gens.items()}}
        out = alternate(runs, args.chunk)
        off, auto = runs["cfm_off"], runs["cfm_auto"]
        row = {"task": task["name"], "kind": task["kind"],
               "identical_greedy": off.tokens == auto.tokens, "tokens": len(off.tokens),
               "decode_tps": {n: o["decode_tps"] for n, o in out.items()},
               "speedup": out["cfm_auto"]["decode_tps"] / out["cfm_off"]["decode_tps"],
               "speedup_median_of_chunks": median(chunk_ratios(out["cfm_off"]["chunks"], out["cfm_auto"]["chunks"])),
               "vs_llama_cpp": {n: out[n]["decode_tps"] / out["llama_cpp"]["decode_tps"] for n in gens},
               "speculative": spec_report(auto), "chunks": {n: o["chunks"] for n, o in out.items()}}
        results.append(row)
        log(f"local {task['name']:<20} off {row['decode_tps']['cfm_off']:6.1f}  auto {row['decode_tps']['cfm_auto']:6.1f}"
            f"  llama.cpp {row['decode_tps']['llama_cpp']:6.1f} tok/s  x{row['speedup']:.2f} "
            f"(chunks x{row['speedup_median_of_chunks']:.2f})  tok/step {row['speculative'].get('tokens_per_step')}"
            f"  identical {row['identical_greedy']}")
    return {"threads": args.threads, "decode_tokens": args.decode, "chunk": args.chunk, "reps": args.reps,
            "tasks": results, "summary": summarize(results, "speedup"),
            "summary_median_of_chunks": summarize(results, "speedup_median_of_chunks")}


def summarize(rows: list[dict], key: str) -> dict:
    out = {}
    for kind in ("drafting", "chat"):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            by_task = {}
            for r in sel:
                by_task.setdefault(r["task"], []).append(r[key])
            task_medians = {t: median(v) for t, v in by_task.items()}  # over the repetitions of each task
            out[kind] = {"speedup_median": median([r[key] for r in sel]), "speedup_min": min(r[key] for r in sel),
                         "speedup_max": max(r[key] for r in sel), "speedup_by_task_median_of_reps": task_medians,
                         "speedup_min_of_task_medians": min(task_medians.values()),
                         "tokens_per_step_median": median([r["speculative"].get("tokens_per_step") or 1.0 for r in sel]),
                         "identical_greedy": all(r["identical_greedy"] for r in sel)}
    return out


# ---------------------------------------------------------------- split


def part_split(args, tasks: list[dict]) -> dict:
    from cfm_runtime.split.client import CenterClient
    from cfm_runtime.split.planner import plan
    from cfm_runtime.speculative import Estimate, estimate

    model = cfm_runtime.load_model(args.model, LoadOptions(threads=args.edge_threads))
    cells = []
    with CenterProcess(model.path, args.center_threads, SPAN, weights="int4") as center:
        for rtt in args.rtts:
            with LinkEmulator(("127.0.0.1", center.info["grpc_port"]), LinkSpec(delay_ms=rtt / 2)) as link:
                address = f"127.0.0.1:{link.port}"
                cell = {"rtt_ms": rtt, "load_before": os.getloadavg()[0], "tasks": []}
                gens = {mode: model.new_generator(RunOptions(center=CenterOptions(address, SPAN), speculate=mode))
                        for mode in args.split_modes}
                try:
                    for task in tasks:
                        runs = {m: StreamRun(model, g, task["messages"], args.split_decode) for m, g in gens.items()}
                        out = alternate(runs, args.chunk)
                        cell["tasks"].append(split_row(task, runs, out))
                        r = cell["tasks"][-1]
                        log(f"split rtt {rtt:>3} {task['name']:<20} " + "  ".join(
                            f"{m} {r['decode_tps'][m]:5.1f}" for m in gens) +
                            f" tok/s  auto x{r['speedup'].get('auto', 0):.2f} edge x{r['speedup'].get('edge', 0):.2f}"
                            f"  identical {r['identical_greedy']}")
                finally:
                    for g in gens.values():
                        g.close()
                cell["summary"] = {m: summarize([{**r, "speedup": r["speedup"][m], "speculative": r["speculative"][m]}
                                                 for r in cell["tasks"]], "speedup") for m in gens if m != "off"}
                cell["planner"] = planner_choices(model, address, cell, plan, CenterClient, estimate, Estimate)
                cell["load_after"] = os.getloadavg()[0]
                cells.append(cell)
    return {"edge_threads": args.edge_threads, "center_threads": args.center_threads, "span": list(SPAN),
            "wire": "fp32", "decode_tokens": args.split_decode, "chunk": args.chunk, "cells": cells,
            "planner_prior": planner_prior(cells)}


def split_row(task: dict, runs: dict, out: dict) -> dict:
    off = runs["off"]
    row = {"task": task["name"], "kind": task["kind"], "tokens": len(off.tokens),
           "identical_greedy": all(r.tokens == off.tokens for r in runs.values()),
           "decode_tps": {m: o["decode_tps"] for m, o in out.items()},
           "speedup": {m: out[m]["decode_tps"] / out["off"]["decode_tps"] for m in out if m != "off"},
           "speedup_median_of_chunks": {m: median(chunk_ratios(out["off"]["chunks"], out[m]["chunks"]))
                                        for m in out if m != "off"},
           "speculative": {m: spec_report(r) for m, r in runs.items() if m != "off"},
           "split": {m: {k: r.stats.extra["split"][k] for k in ("positions_center", "positions_local", "fallbacks",
                                                               "round_trip_ms", "center_compute_ms")}
                     for m, r in runs.items()},
           "decode_steps": {m: r.stats.decode_steps for m, r in runs.items()}}
    row["tokens_per_round_trip"] = {m: row["tokens"] / max(1, steps) for m, steps in row["decode_steps"].items()}
    return row


def planner_choices(model, address, cell, plan, client_cls, estimate, estimate_cls) -> dict:
    """The planner through this link: without speculation, with its prior, and with this cell's measured lookup
    acceptance (tokens and positions per step of 'auto' over every task)."""
    rows = [r["speculative"]["auto"] for r in cell["tasks"] if "auto" in r["speculative"] and r["speculative"]["auto"]]
    measured = None
    if rows:
        steps = sum(r["steps"] for r in rows)
        tokens = sum(r["tokens_per_step"] * r["steps"] for r in rows if r["tokens_per_step"])
        positions = steps + sum(r["drafted"] for r in rows)
        measured = estimate_cls(round(tokens / steps, 3), round(positions / steps, 3), model.backend.position_cost)
    out = {}
    prior = estimate("auto", model.backend.position_cost)
    for name, spec in (("no speculation", None), ("prior", prior), ("measured", measured)):
        client = client_cls(address)
        try:
            p = plan(model, client, "fp32", spec=spec)
        finally:
            client.close()
        out[name] = p.to_dict()
    return out


def planner_prior(cells: list[dict]) -> dict | None:
    """Tokens and positions per step of 'auto' at the RTT closest to 50 ms: the planner's prior in speculative.py."""
    if not cells:
        return None
    cell = min(cells, key=lambda c: abs(c["rtt_ms"] - 50))
    est = cell["planner"].get("measured") or {}
    return {"rtt_ms": cell["rtt_ms"], **(est.get("speculation") or {})}


# ---------------------------------------------------------------- fp32


def part_fp32(args, tasks: list[dict]) -> dict:
    model = cfm_runtime.load_model(args.model, LoadOptions(threads=args.threads, weights="fp32"))
    rows = []
    for task in tasks:
        answers = {}
        for mode in ("off", "lookup"):
            gen = model.new_generator(RunOptions(speculate=mode))
            chunks = list(model.stream(task["messages"], generator=gen, temperature=0, max_tokens=args.fp32_decode))
            answers[mode] = [c.token for c in chunks if c.token is not None]
        a, b = answers["off"], answers["lookup"]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
        rows.append({"task": task["name"], "kind": task["kind"], "tokens": len(a), "identical_greedy": first is None,
                     "first_difference": first})
        log(f"fp32 {task['name']:<20} identical {first is None} (first difference at {first})")
    return {"decode_tokens": args.fp32_decode, "tasks": rows,
            "identical": sum(r["identical_greedy"] for r in rows), "of": len(rows)}


# ---------------------------------------------------------------- plot


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    local = result.get("local")
    if local:
        ax = axes[0]
        names = list(dict.fromkeys(r["task"] for r in local["tasks"]))  # repetitions: the median
        x = np.arange(len(names))
        for i, (key, color) in enumerate((("llama_cpp", "#888"), ("cfm_off", "#37a"), ("cfm_auto", "#3a7"))):
            ax.bar(x + (i - 1) * 0.27, [median([r["decode_tps"][key] for r in local["tasks"] if r["task"] == n])
                                        for n in names], 0.27, label=key, color=color)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"local decode tok/s ({local['threads']} threads)")
        ax.legend(fontsize=8)
    split = result.get("split")
    if split:
        ax = axes[1]
        rtts = [c["rtt_ms"] for c in split["cells"]]
        for mode, style in (("off", "-"), ("auto", "--"), ("edge", ":")):
            for kind, color in (("drafting", "#3a7"), ("chat", "#a37")):
                ys = [median([r["decode_tps"][mode] for r in c["tasks"] if r["kind"] == kind and mode in r["decode_tps"]])
                      for c in split["cells"]]
                if all(y is not None for y in ys):
                    ax.plot(rtts, ys, style, color=color, marker="o", label=f"{mode} {kind}")
        ax.set_xlabel("RTT ms")
        ax.set_title("split 2:28 decode tok/s (median over tasks)")
        ax.legend(fontsize=7)
        ax = axes[2]
        for mode, color in (("auto", "#3a7"), ("edge", "#a73")):
            vals = [(r["task"], r["speculative"][mode].get("acceptance_rate") or 0) for c in split["cells"][:1]
                    for r in c["tasks"] if mode in r["speculative"]]
            if vals:
                x = np.arange(len(vals))
                ax.bar(x + (0.2 if mode == "edge" else -0.2), [v for _, v in vals], 0.4, label=f"{mode} acceptance",
                       color=color)
                ax.set_xticks(x, [n for n, _ in vals], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("drafted tokens accepted (split, first RTT)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2, help="threads of the local runs")
    ap.add_argument("--edge-threads", type=int, default=1, help="threads of the edge in split runs")
    ap.add_argument("--center-threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64, help="tokens per local answer at most")
    ap.add_argument("--split-decode", type=int, default=48, help="tokens per split answer at most")
    ap.add_argument("--fp32-decode", type=int, default=48)
    ap.add_argument("--chunk", type=int, default=16, help="decode tokens per runtime per turn (alternation)")
    ap.add_argument("--reps", type=int, default=2, help="local runs of every task")
    ap.add_argument("--rtts", default="0,10,50,100", help="emulated round-trip times, ms")
    ap.add_argument("--split-modes", default="off,auto,edge")
    ap.add_argument("--parts", default="local,split,fp32")
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.rtts = [float(x) for x in args.rtts.split(",")]
    args.split_modes = args.split_modes.split(",")
    tasks = load_tasks()
    if args.tasks:
        tasks = [t for t in tasks if t["name"] in args.tasks.split(",")]
    result = {"benchmark": "speculative", "tasks_file": str(TASKS.relative_to(TASKS.parents[2])),
              "environment": environment(args.threads), "load_average": {},
              "note": "shared 2-core machine: absolute speeds move with other tenants' load (recorded per part); "
                      "compare the paired ratios"}
    parts = {"local": part_local, "split": part_split, "fp32": part_fp32}
    for name in args.parts.split(","):
        before = os.getloadavg()
        t0 = time.perf_counter()
        result[name] = parts[name](args, tasks)
        result["load_average"][name] = {"before_1_5_15": before, "after_1_5_15": os.getloadavg(),
                                        "seconds": round(time.perf_counter() - t0, 1)}
        out_dir = Path(args.out or RESULTS)
        save("speculative", result, out_dir)
        plot(result, out_dir / "speculative.png")
    log(f"saved {out_dir / 'speculative.json'} and speculative.png")
    return result


if __name__ == "__main__":
    main()
