"""Memory of a default run, and speed under memory caps: cfm against llama-cpp-python on the embedded model.

1. Peak memory: a default `cfm generate` (int4, the lean native path) and llama-cpp-python (n_ctx 512 and 2048)
   each in a fresh process, alternating, a greedy chat answer of --tokens tokens; per run the peak resident set
   (VmHWM, loading included) and, at the end of the answer, its parts: RssAnon (heap, caches: not reclaimable)
   and RssFile (mapped pages of the model file: reclaimable, re-read on demand); for cfm, as the answer's own
   stats report them (the command unmaps the model before it exits).
2. Caps (--caps, needs a writable cgroup v1 memory hierarchy, i.e. root): the same two runs in a fresh memory
   cgroup per run, page cache counted, the model file evicted from the page cache before each run
   (posix_fadvise DONTNEED; a page stays charged to the cgroup that first read it), --cap-reps rounds over the
   caps. cfm runs as a plain `cfm generate`: under a cap it spends what the cap leaves (`--ram-budget auto`).
   Decode tok/s, completion or OOM kill, greedy agreement with the unconstrained fp32 answer (characters of a
   common prefix), and per cap the medians, the ratio and cfm's budget and bytes read per token.

    python benchmarks/bench_memory.py [--reps 3] [--tokens 48] [--caps 400,300,200,150,120,100,80] [--cap-reps 2]
                                      [--out memory]

Writes benchmarks/results/memory.json and memory.png, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, environment, median, save  # noqa: E402
from cfm_runtime.sparse.io import drop_page_cache  # noqa: E402

PROMPT = "Explain in a few sentences why the sea is salty."
CGROUP = Path("/sys/fs/cgroup/memory")

STATUS = """
def status():
    out = {}
    for line in open("/proc/self/status"):
        k = line.split(":")[0]
        if k in ("VmHWM", "RssAnon", "RssFile"):
            out[k] = int(line.split()[1]) / 1024
    return {"peak_mb": out["VmHWM"], "rss_anon_mb": out["RssAnon"], "rss_file_mb": out["RssFile"]}
"""

# llama-cpp-python, streamed so that prompt and decode time are apart; nothing of cfm_runtime is imported
LLAMA = STATUS + """
import json, sys, time
from cfm_runtime.reference import open_llama
llm = open_llama(sys.argv[1], n_ctx=int(sys.argv[4]), n_threads=2, verbose=False)
t0 = time.perf_counter()
first, pieces = None, []
for chunk in llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}], max_tokens=int(sys.argv[3]),
                                        temperature=0, stream=True):
    piece = chunk["choices"][0]["delta"].get("content")
    if piece:
        first = first or time.perf_counter()
        pieces.append(piece)
end = time.perf_counter()
n = len(llm.tokenize("".join(pieces).encode(), add_bos=False, special=True))
print(json.dumps({"text": "".join(pieces), "tokens": n, "decode_tps": (n - 1) / (end - first) if n > 1 else 0.0,
                  **status()}))
"""

CFM = STATUS + """
import contextlib, io, json, sys
from cfm_cli.main import main
out = io.StringIO()
with contextlib.redirect_stdout(out):  # `cfm generate` as a user runs it, its JSON answer captured
    code = main(["generate", "--model", sys.argv[1], "--chat", "--prompt", sys.argv[2], "--max-tokens", sys.argv[3],
                 "--weights", sys.argv[4], "--threads", "2", "--temperature", "0", "--json"])
answer = json.loads(out.getvalue())
print(json.dumps({"text": answer["text"], "tokens": answer["generated_tokens"], "decode_tps": answer["decode_tps"],
                  "backend": answer.get("backend"), "torch_imported": "torch" in sys.modules, "exit": code,
                  "llama_cpp_imported": "llama_cpp" in sys.modules, "ram_budget": answer.get("ram_budget"),
                  **status(), "rss_anon_mb": answer["rss_anon_mb"], "rss_file_mb": answer["rss_file_mb"]}))
"""


def run(cmd: list[str], cap_mb: int | None = None, timeout: float = 900) -> dict:
    """cmd in a fresh process (in a new memory cgroup capped at cap_mb if given) -> its JSON line or the failure."""
    group = CGROUP / f"cfm-mem-{uuid.uuid4().hex[:8]}" if cap_mb else None
    if group:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap_mb << 20))
        (group / "memory.memsw.limit_in_bytes").write_text(str(cap_mb << 20)) \
            if (group / "memory.memsw.limit_in_bytes").exists() else None
        cmd = ["/bin/sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    oom, cg_peak = False, None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=os.environ | {"OMP_NUM_THREADS": "2"})
        if group:
            oom = "oom_kill 1" in (group / "memory.oom_control").read_text()
            cg_peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
    except subprocess.TimeoutExpired:
        return {"ok": False, "timeout_s": timeout}
    finally:
        if group:
            for _ in range(50):  # the killed process may take a moment to leave the group
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    wall = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        return {"ok": False, "oom_killed": oom, "returncode": proc.returncode, "stderr": proc.stderr[-400:],
                "wall_s": wall}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": True, "cgroup_peak_mb": cg_peak, "wall_s": wall, **out}


def commands(model: Path, tokens: int) -> dict[str, list[str]]:
    py = sys.executable
    return {"cfm": [py, "-c", CFM, str(model), PROMPT, str(tokens), "int4"],
            "llama_cpp_512": [py, "-c", LLAMA, str(model), PROMPT, str(tokens), "512"],
            "llama_cpp_2048": [py, "-c", LLAMA, str(model), PROMPT, str(tokens), "2048"]}


def agreement(a: str, b: str) -> float:
    """Fraction of the longer text that is a common prefix of both."""
    n = max(len(a), len(b), 1)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return round(same / n, 3)


def peaks(cmds: dict, reps: int, pause: float) -> dict:
    rows: dict[str, list] = {k: [] for k in cmds}
    for r in range(reps):
        for name, cmd in cmds.items():  # alternating, a pause between runtimes
            rows[name].append(run(cmd))
            print(name, {k: rows[name][-1].get(k) for k in ("peak_mb", "rss_anon_mb", "rss_file_mb", "decode_tps")},
                  flush=True)
            time.sleep(pause)
    out = {}
    for name, rs in rows.items():
        ok = [x for x in rs if x["ok"]]
        out[name] = {k: median([x[k] for x in ok]) for k in ("peak_mb", "rss_anon_mb", "rss_file_mb", "decode_tps")}
        out[name]["runs"] = rs
    base = out["llama_cpp_512"]["peak_mb"]
    out["cfm_peak_over_llama_cpp_512"] = round(out["cfm"]["peak_mb"] / base, 3) if base else None
    return out


def caps(cmds: dict, model: Path, tokens: int, levels: list[int], pause: float, reps: int) -> dict:
    reference = run([sys.executable, "-c", CFM, str(model), PROMPT, str(tokens), "fp32"])
    rows = []
    for rep in range(reps):
        for cap in levels:
            for name in ("cfm", "llama_cpp_512"):  # alternating, a pause between runtimes
                drop_page_cache(model)  # its pages are charged to whichever cgroup reads them first
                r = run(cmds[name], cap)
                r.update(runtime=name, cap_mb=cap, rep=rep)
                if r["ok"]:
                    r["agreement_with_fp32"] = agreement(r["text"], reference["text"])
                rows.append(r)
                print(cap, name, {k: r.get(k) for k in ("ok", "oom_killed", "decode_tps", "peak_mb",
                                                        "agreement_with_fp32")}, flush=True)
                time.sleep(pause)
    return {"fp32_reference": reference, "runs": rows, "summary": summary(rows, levels)}


def summary(rows: list[dict], levels: list[int]) -> list[dict]:
    """Per cap: each runtime's median decode tok/s over its completed runs, its OOM kills, cfm's RAM budget and
    bytes read per token (what holds its speed), the ratio, and whether llama.cpp ran below half its speed at
    the largest cap (where the 3x target applies)."""
    def runs(name, cap):
        return [r for r in rows if r["runtime"] == name and r["cap_mb"] == cap]

    def tps(name, cap):
        ok = [r["decode_tps"] for r in runs(name, cap) if r["ok"]]
        return median(ok) if ok else None

    top = tps("llama_cpp_512", max(levels))
    out = []
    for cap in levels:
        cfm, llama = tps("cfm", cap), tps("llama_cpp_512", cap)
        budget = next((r.get("ram_budget") for r in runs("cfm", cap) if r["ok"] and r.get("ram_budget")), None)
        out.append({"cap_mb": cap, "cfm_tps": cfm, "llama_cpp_tps": llama,
                    "cfm_over_llama_cpp": round(cfm / llama, 2) if cfm and llama else None,
                    "llama_cpp_below_half": llama is None or (top is not None and llama < top / 2),
                    "oom_killed": {n: sum(1 for r in runs(n, cap) if r.get("oom_killed")) for n in ("cfm", "llama_cpp_512")},
                    "cfm_ram_budget_mb": budget and budget["ram_budget_mb"],
                    "cfm_read_mb_per_token": budget and budget["streamed_mb_per_pass"],
                    "cfm_held_mb": budget and budget["held_mb"]})
        print(out[-1], flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = result["peaks"]
    names = ["cfm", "llama_cpp_512", "llama_cpp_2048"]
    panels = 2 if result.get("caps") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    anon = [p[n]["rss_anon_mb"] or 0 for n in names]
    file = [p[n]["rss_file_mb"] or 0 for n in names]
    ax.bar(names, anon, label="RssAnon at end")
    ax.bar(names, file, bottom=anon, label="RssFile at end (model file pages)")
    ax.scatter(names, [p[n]["peak_mb"] or 0 for n in names], color="k", zorder=3, label="peak (VmHWM)")
    ax.set_ylabel("MB")
    ax.set_title("memory of a greedy chat answer")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        rows = result["caps"]["summary"]
        for name, key in (("cfm (plain `cfm generate`)", "cfm_tps"), ("llama_cpp_512", "llama_cpp_tps")):
            ax.plot([r["cap_mb"] for r in rows], [r[key] or 0.0 for r in rows], "o-", label=name)
        for r in rows:
            for name, n in r["oom_killed"].items():
                if n:
                    ax.annotate(f"{name} OOM x{n}", (r["cap_mb"], 0.3 if name == "cfm" else 0.1), fontsize=7)
        ax.set_xlabel("cgroup memory cap (MB, page cache counted)")
        ax.set_ylabel("decode tok/s")
        ax.set_yscale("symlog", linthresh=1)
        ax.invert_xaxis()
        ax.set_title("decode speed under a memory cap")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from cfm_runtime.loading import default_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--caps", default="", help="comma-separated cgroup caps in MB (needs cgroup v1, root)")
    ap.add_argument("--cap-reps", type=int, default=2, help="runs of each runtime per cap (medians reported)")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between runs")
    ap.add_argument("--out", default="memory")
    args = ap.parse_args()
    model = default_model_path()
    cmds = commands(model, args.tokens)
    result = {"env": environment(2), "loadavg_before": os.getloadavg(), "prompt": PROMPT, "tokens": args.tokens,
              "peaks": peaks(cmds, args.reps, args.pause)}
    levels = [int(c) for c in args.caps.split(",") if c]
    if levels:
        if not os.access(CGROUP, os.W_OK):
            raise SystemExit(f"--caps needs a writable cgroup v1 memory hierarchy at {CGROUP}")
        result["caps"] = caps(cmds, model, args.tokens, levels, args.pause, args.cap_reps)
    result["loadavg_after"] = os.getloadavg()
    print(save(args.out, result))
    plot(result, RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    main()
