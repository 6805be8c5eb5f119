"""Grammar engines for constrained decoding (JSON schema / JSON mode), measured on the embedded model's tokenizer.

Three engines, as installed: llguidance, xgrammar and outlines_core, on SmolLM2-135M-Instruct's GGUF vocabulary
(49152 tokens; ids 0-16 are control tokens whose text piece is empty; end of generation {0, 2, 4}, EOS 2).

- imports: each engine imported in a fresh subprocess (numpy and llama_cpp, which the runtime already has,
  imported first): import seconds, RSS growth, whether torch came with it.
- decode: the model's own greedy decode step (`model.stream` on a new generator, as the server runs it, so
  `--speculate auto` is on; up to 64 tokens, a few runs): ms per token = 1000 / `stats.decode_tps`, ms per runner
  step, and the median interval between streamed chunks as a cross-check. Measured before any engine is imported
  into this process (xgrammar brings torch).
- engines: per engine, tokenizer setup (once); per schema (flat object, nested object with arrays of objects and
  an enum, and OpenAI's json_object mode `{"type": "object"}`), grammar compile ms; then a hand-written valid
  instance, tokenized with `tok.encode(text, add_special=False)`, is replayed: before each token the next-token
  bitmask is filled, then the token is consumed (and one last mask after the final token, where only the end
  tokens may be allowed). The first replay right after compile is reported as cold; `--replays` more after a
  reset give the warm median/p95 µs per token. Allowed-token counts per position are saved, and at a few
  positions the allowed sets are compared with llguidance's. Mask cost is reported as a fraction of a decode step.
- constrained: the runtime's own constrained decoding (`SamplingParams.grammar`: llguidance's mask applied in the
  sampler) on a nested schema (objects, an array, an enum, a pattern), against the same prompts unconstrained, in
  the same run, greedy, with speculation off and auto: the constrained answer first, then the free one cut at as
  many tokens (same length, same attention cost; on odd repetitions the pair is timed again in the other order);
  decode tok/s per answer, the median of the paired ratios, and whether each constrained answer parses.
  Plot: grammar_constrained.png. xgrammar and outlines-core are not dependencies of the project: install them
  to compare (`pip install xgrammar outlines-core`; xgrammar brings torch, and may bring triton, which makes
  every later `import torch` ~100 MB larger).

Formatting is held as close as the engines allow: llguidance and xgrammar emit exactly `", "` and `": "` with no
other whitespace; outlines_core's regex allows an optional single space around every separator (`[ ]?`), so it
allows a few more tokens at some positions. Schemas set additionalProperties false where they list properties.

    python benchmarks/bench_grammar.py [--replays 5] [--decode-runs 3] [--threads N]
        [--parts imports,decode,engines,constrained] [--constrained-reps 2]

Saves benchmarks/results/grammar_engines.json and grammar_constrained.png. The machine is shared: the JSON records
the load average before and after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, median, save, versions  # noqa: E402

import cfm_bench  # noqa: E402

ENGINES = ("llguidance", "xgrammar", "outlines_core")
SEPARATORS = (", ", ": ")

SCHEMAS = {
    "flat": {
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "active": {"type": "boolean"}},
            "required": ["name", "age", "active"],
            "additionalProperties": False,
        },
        "instance": {"name": "Ada Lovelace", "age": 36, "active": True},
    },
    "nested": {
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "status": {"enum": ["draft", "published", "archived"]},
                "authors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                                       "year": {"type": "integer"}},
                        "required": ["name", "year"],
                        "additionalProperties": False,
                    },
                },
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["title", "status", "authors"],
            "additionalProperties": False,
        },
        "instance": {
            "title": "Notes on the Analytical Engine",
            "status": "published",
            "authors": [{"name": "Ada Lovelace", "email": "ada@example.org", "year": 1843},
                        {"name": "Charles Babbage", "year": 1837}],
            "tags": ["computing", "history"],
        },
    },
    "json_object": {
        "schema": {"type": "object"},
        "instance": {"id": 7, "items": [{"sku": "A-1", "qty": 2, "price": 9.5}], "note": None, "ok": False,
                     "meta": {"source": "test"}},
    },
}

IMPORTS = {
    "llguidance": "import llguidance, llguidance.numpy, llguidance.llamacpp",
    "xgrammar": "import xgrammar",
    "outlines_core": "import outlines_core",
}

IMPORT_PROBE = """
import json, sys, time
import psutil, numpy, llama_cpp
p = psutil.Process()
rss0 = p.memory_info().rss
t0 = time.perf_counter()
{stmt}
seconds = time.perf_counter() - t0
rss1 = p.memory_info().rss
print(json.dumps({{"seconds": seconds, "rss_before_mb": rss0 / 2**20, "rss_growth_mb": (rss1 - rss0) / 2**20,
                  "torch_imported": "torch" in sys.modules}}))
"""

DECODE_MESSAGES = [{"role": "user", "content": "Write a JSON list of three books, each an object with its title, "
                                               "author and year."}]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def popcount(mask: np.ndarray) -> int:
    return int(np.unpackbits(mask.view(np.uint8)).sum())


def allowed_ids(mask: np.ndarray, n: int) -> np.ndarray:
    bits = np.unpackbits(mask.reshape(-1).view(np.uint8), bitorder="little")[:n]
    return np.flatnonzero(bits)


# ---------------------------------------------------------------------------------------------- imports


def part_imports(args) -> dict:
    out = {}
    for rep in range(args.import_reps):
        for name in ENGINES:
            proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(stmt=IMPORTS[name])],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"import probe for {name} failed: {proc.stderr[-2000:]}")
            out.setdefault(name, {"statement": IMPORTS[name], "runs": []})["runs"].append(
                json.loads(proc.stdout.strip().splitlines()[-1]))
    for name, r in out.items():
        r["seconds_min"] = min(x["seconds"] for x in r["runs"])
        r["rss_growth_mb_median"] = median([x["rss_growth_mb"] for x in r["runs"]])
        r["torch_imported"] = any(x["torch_imported"] for x in r["runs"])
        log(f"import {name}: {r['seconds_min']:.2f} s, +{r['rss_growth_mb_median']:.0f} MB RSS, "
            f"torch {r['torch_imported']}")
    return out


# ---------------------------------------------------------------------------------------------- decode


def part_decode(args, model) -> dict:
    runs = []
    for _ in range(args.decode_runs):
        gen = model.new_generator()
        stamps, stats, n = [], None, 0
        try:
            for chunk in model.stream(DECODE_MESSAGES, generator=gen, temperature=0, max_tokens=args.decode_tokens):
                stamps.append(time.perf_counter())
                stats = chunk.stats
                n += chunk.token is not None
        finally:
            gen.close()
        gaps = np.diff(stamps[1:]) * 1000 if len(stamps) > 2 else []  # after the first token (prefill)
        runs.append({"decode_tps": stats.decode_tps, "step_ms": 1000 / stats.decode_tps,
                     "decode_tokens": stats.decode_tokens, "decode_steps": stats.decode_steps,
                     "step_ms_per_runner_step": 1000 * stats.decode_seconds / max(stats.decode_steps, 1),
                     "tokens": n, "prompt_tokens": stats.prompt_tokens,
                     "chunk_interval_ms_median": median(list(gaps)), "finish_reason": stats.finish_reason,
                     "telemetry": stats.extra})
        log(f"decode: {stats.decode_tps:.1f} tok/s ({1000 / stats.decode_tps:.2f} ms/token), "
            f"{stats.decode_tokens} tokens")
    return {"messages": DECODE_MESSAGES, "max_tokens": args.decode_tokens, "runs": runs,
            "step_ms_median": median([r["step_ms"] for r in runs]),
            "decode_tps_median": median([r["decode_tps"] for r in runs])}


# ---------------------------------------------------------------------------------------------- constrained

PERSON = json.loads((Path(cfm_bench.__file__).parent / "data" / "person_schema.json").read_text())
CONSTRAINED_SCHEMA, CONSTRAINED_PROMPTS = PERSON["schema"], PERSON["prompts"]  # the schema tests/test_agent_api.py uses


def constrained_run(model, gen, msgs, grammar, max_tokens: int) -> dict:
    time.sleep(0.1)  # untimed: spinning workers of the previous run stop
    gen.reset()
    chunks = list(model.stream(msgs, generator=gen, temperature=0, max_tokens=max_tokens, grammar=grammar))
    st = chunks[-1].stats
    parses = None
    if grammar is not None:
        try:
            json.loads("".join(c.text for c in chunks))
            parses = True
        except ValueError:
            parses = False
    return {"decode_tps": st.decode_tps, "tokens": st.generated_tokens, "finish_reason": st.finish_reason,
            "parses": parses, "tokens_per_step": st.decode_tokens / max(st.decode_steps, 1)}


def part_constrained(args, model) -> dict:
    """Decode tok/s of the same prompts unconstrained and under the JSON schema (the runtime's own path:
    `SamplingParams.grammar`, llguidance masks in the sampler), alternating, with and without speculation."""
    from cfm_runtime import RunOptions
    from cfm_runtime.grammar import Grammar

    grammar = Grammar.json_schema(CONSTRAINED_SCHEMA)
    gens = {spec: model.new_generator(RunOptions(speculate=spec)) for spec in ("off", "auto")}
    rows = []
    for rep in range(args.constrained_reps):
        for prompt in CONSTRAINED_PROMPTS:
            msgs = [{"role": "user", "content": prompt}]
            for spec in ("off", "auto"):
                # the constrained answer first: the free one then decodes as many tokens (same lengths, same
                # attention cost); the order of the timed pair alternates between repetitions
                n = None
                pair = {}
                for g in ("json", "free"):
                    pair[g] = constrained_run(model, gens[spec], msgs, grammar if g == "json" else None,
                                              n or args.constrained_tokens)
                    n = pair["json"]["tokens"]
                if rep % 2:  # time the pair in the other order too
                    for g in ("free", "json"):
                        pair[g] = constrained_run(model, gens[spec], msgs, grammar if g == "json" else None, n)
                for g in ("json", "free"):
                    rows.append({"rep": rep, "prompt": prompt, "speculate": spec, "constraint": g, **pair[g]})
                log(f"constrained: {spec:>4} json {pair['json']['decode_tps']:6.1f} free "
                    f"{pair['free']['decode_tps']:6.1f} tok/s, {n} tokens ({prompt[:30]})")
    summary = {}
    for spec in ("off", "auto"):
        free = [r["decode_tps"] for r in rows if r["speculate"] == spec and r["constraint"] == "free"]
        js = [r["decode_tps"] for r in rows if r["speculate"] == spec and r["constraint"] == "json"]
        summary[spec] = {"free_tps_median": median(free), "json_tps_median": median(js),
                         "ratio_median": median([b / a for a, b in zip(free, js)]),
                         "json_parses": sum(r["parses"] for r in rows if r["speculate"] == spec and r["parses"]
                                            is not None)}
        log(f"constrained: speculate {spec}: free {summary[spec]['free_tps_median']:.1f} tok/s, json "
            f"{summary[spec]['json_tps_median']:.1f} tok/s, ratio {summary[spec]['ratio_median']:.3f}")
    for gen in gens.values():
        gen.close()
    return {"schema": CONSTRAINED_SCHEMA, "max_tokens": args.constrained_tokens, "rows": rows, "summary": summary}


def plot_constrained(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"speculate {s}\n{g}" for s in ("off", "auto") for g in ("free", "json")]
    data = [[r["decode_tps"] for r in rows if r["speculate"] == s and r["constraint"] == g]
            for s in ("off", "auto") for g in ("free", "json")]
    ax.boxplot(data, tick_labels=labels)
    ax.set_ylabel("decode tok/s (per answer)")
    ax.set_title("Greedy decode, unconstrained (free) vs under a nested JSON schema (llguidance)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- engines


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab_bytes):
        import llguidance
        import llguidance.numpy

        self.llg, self.lln = llguidance, llguidance.numpy
        t0 = time.perf_counter()
        self.tokenizer = tok.grammar_tokenizer()  # the runtime's own (built here, on first use)
        self.setup_ms = (time.perf_counter() - t0) * 1000
        self.notes = {"is_canonical": self.tokenizer.is_canonical, "eos_tokens": self.tokenizer.eos_tokens,
                      "special_tokens": [i for i in range(tok.vocab_size) if self.tokenizer.is_special_token(i)]}
        self.n = tok.vocab_size

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": SEPARATORS[0],
                              "key_separator": SEPARATORS[1]})
        m = self.llg.LLMatcher(self.tokenizer, grammar)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def new_mask(self):
        return self.lln.allocate_token_bitmask(1, self.n)

    def fill(self, m, mask):
        self.lln.fill_next_token_bitmask(m, mask)

    def consume(self, m, token) -> bool:
        return m.consume_token(token)

    def reset(self, m):
        m.reset()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab_bytes):
        import xgrammar

        self.xgr = xgrammar
        t0 = time.perf_counter()
        info = xgrammar.TokenizerInfo(vocab_bytes, xgrammar.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=sorted(tok.eog_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=len(os.sched_getaffinity(0)), cache_enabled=False)
        self.setup_ms = (time.perf_counter() - t0) * 1000
        self.notes = {"vocab_type": "RAW", "stop_token_ids": info.stop_token_ids,
                      "special_token_ids": info.special_token_ids,
                      "setup_excludes": "reading the token bytes from llama.cpp (shared with outlines_core)"}
        self.n = tok.vocab_size

    def compile(self, schema):
        cg = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
        return self.xgr.GrammarMatcher(cg)

    def new_mask(self):  # numpy through DLPack, as the runtime would pass it
        return np.full((1, (self.n + 31) // 32), -1, dtype=np.int32)

    def fill(self, m, mask):
        m.fill_next_token_bitmask(mask)

    def consume(self, m, token) -> bool:
        return m.accept_token(token)

    def reset(self, m):
        m.reset()


class OutlinesCore:
    name = "outlines_core"

    def __init__(self, tok, vocab_bytes):
        import outlines_core

        self.oc = outlines_core
        t0 = time.perf_counter()
        pieces: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab_bytes):
            if i in tok.eog_ids or not b:  # control tokens (empty text pieces) are never text
                continue
            pieces.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(tok.eos_id, pieces)
        self.setup_ms = (time.perf_counter() - t0) * 1000
        self.notes = {"eos_token_id": tok.eos_id, "excluded": "end-of-generation ids and tokens with an empty text "
                      "piece (the 17 control tokens); Vocabulary takes one EOS id, so 0 and 4 are never allowed",
                      "setup_excludes": "reading the token bytes from llama.cpp (shared with xgrammar)"}
        self.n = tok.vocab_size

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def new_mask(self):
        return np.full((1, (self.n + 31) // 32), -1, dtype=np.int32)

    def fill(self, g, mask):
        g.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)

    def consume(self, g, token) -> bool:
        try:
            g.advance(token, return_tokens=False)
            return True
        except Exception:  # outlines_core raises on a token the state does not allow
            return False

    def reset(self, g):
        g.reset()


def greedy_path(engine, text: bytes, vocab_bytes) -> list[int]:
    """A token path the engine accepts: at each step the longest allowed token that is a prefix of the rest."""
    m = engine.compile_cached
    engine.reset(m)
    mask, path, rest = engine.new_mask(), [], text
    while rest:
        engine.fill(m, mask)
        best = max((i for i in allowed_ids(mask, engine.n) if vocab_bytes[i] and rest.startswith(vocab_bytes[i])),
                   key=lambda i: len(vocab_bytes[i]), default=None)
        if best is None or not engine.consume(m, best):
            raise RuntimeError(f"{engine.name}: no allowed token continues {rest[:40]!r}")
        path.append(best)
        rest = rest[len(vocab_bytes[best]):]
    return path


def replay(engine, m, ids, keep_masks=False):
    """Fill the mask before each token and consume it, then one last mask. -> (mask µs, consume µs, masks, bad)."""
    mask = engine.new_mask()
    mask_us, consume_us, masks = [], [], []
    for k, token in enumerate(list(ids) + [None]):
        t0 = time.perf_counter()
        engine.fill(m, mask)
        t1 = time.perf_counter()
        mask_us.append((t1 - t0) * 1e6)
        if keep_masks:
            masks.append(mask.copy())
        if token is None:
            break
        t1 = time.perf_counter()
        ok = engine.consume(m, token)
        consume_us.append((time.perf_counter() - t1) * 1e6)
        if not ok:
            return mask_us, consume_us, masks, k
    return mask_us, consume_us, masks, None


def run_engine(engine, tok, vocab_bytes, instances, replays: int) -> tuple[dict, dict]:
    res = {"setup_ms": engine.setup_ms, "notes": engine.notes, "schemas": {}}
    masks_by_schema = {}
    for sname, spec in SCHEMAS.items():
        ids, text = instances[sname]
        t0 = time.perf_counter()
        m = engine.compile(spec["schema"])
        compile_ms = [(time.perf_counter() - t0) * 1000]
        while sum(compile_ms) < 1000 and len(compile_ms) < 3:  # repeat cheap compiles; keep the first matcher
            t0 = time.perf_counter()
            engine.compile(spec["schema"])
            compile_ms.append((time.perf_counter() - t0) * 1000)
        engine.compile_cached = m
        cold_mask, cold_consume, _, bad = replay(engine, m, ids)
        path, path_note = ids, "tok.encode(text, add_special=False)"
        if bad is not None:
            log(f"{engine.name}/{sname}: rejected token {bad} ({vocab_bytes[ids[bad]]!r}); using a greedy path")
            path_note = (f"tok.encode path rejected at position {bad} (token {ids[bad]} "
                         f"{vocab_bytes[ids[bad]]!r}); replayed the greedy longest-allowed-token path instead")
            path = greedy_path(engine, text.encode(), vocab_bytes)
            engine.reset(m)
            cold_mask, cold_consume, _, bad = replay(engine, m, path)  # not cold any more: say so below
        warm_mask, warm_consume, masks = [], [], None
        for r in range(replays):
            engine.reset(m)
            mu, cu, mk, bad2 = replay(engine, m, path, keep_masks=(r == 0))
            if bad2 is not None:
                raise RuntimeError(f"{engine.name}/{sname}: path rejected on replay at {bad2}")
            warm_mask += mu
            warm_consume += cu
            masks = mk if r == 0 else masks
        masks_by_schema[sname] = masks
        step = [a + b for a, b in zip(warm_mask, warm_consume + [0.0])]
        res["schemas"][sname] = {
            "compile_ms": compile_ms, "compile_ms_first": compile_ms[0],
            "tokens": len(path), "token_path": path_note, "same_path_as_encode": path == ids,
            "cold": {"first_mask_us": cold_mask[0], "mask_us_median": median(cold_mask),
                     "mask_us_max": max(cold_mask), "mask_us_total": sum(cold_mask),
                     "after_greedy_search": bad is None and path != ids},
            "mask_us_median": median(warm_mask), "mask_us_p95": pct(warm_mask, 95), "mask_us_max": max(warm_mask),
            "consume_us_median": median(warm_consume), "consume_us_p95": pct(warm_consume, 95),
            "mask_and_consume_us_median": median(step), "mask_and_consume_us_p95": pct(step, 95),
            "allowed_counts": [popcount(x) for x in masks],
            "final_mask_allows": allowed_ids(masks[-1], engine.n).tolist()[:20],
        }
        s = res["schemas"][sname]
        log(f"{engine.name}/{sname}: compile {compile_ms[0]:.2f} ms, mask {s['mask_us_median']:.1f}/"
            f"{s['mask_us_p95']:.1f} µs (median/p95), consume {s['consume_us_median']:.1f} µs, {len(path)} tokens")
    return res, masks_by_schema


def show(vocab_bytes, i: int) -> str:
    """A token's text for the JSON, control characters escaped; `<id>` for an empty piece (control token)."""
    b = vocab_bytes[i]
    return repr(b.decode("utf-8", "replace"))[1:-1] if b else f"<{i}>"


def agreement(all_masks: dict, instances: dict, vocab_bytes, n: int) -> dict:
    """Allowed sets compared with llguidance's at a few positions (only where all engines replayed the same path)."""
    out = {}
    ref = "llguidance"
    for sname in SCHEMAS:
        ids = instances[sname][0]
        engines = [e for e in all_masks if sname in all_masks[e]]
        lengths = {e: len(all_masks[e][sname]) for e in engines}
        entry = {"positions": {}}
        if len(set(lengths.values())) != 1:
            entry["note"] = f"token paths differ in length {lengths}; compared the first positions only"
        last = min(lengths.values()) - 1
        for k in sorted({0, 1, len(ids) // 3, 2 * len(ids) // 3, last}):
            before = vocab_bytes[ids[k - 1]] if 0 < k <= len(ids) else b""
            row = {"after_token": before.decode("utf-8", "replace"), "counts": {}, "vs_llguidance": {}}
            base = set(allowed_ids(all_masks[ref][sname][k], n).tolist()) if ref in engines else None
            for e in engines:
                got = set(allowed_ids(all_masks[e][sname][k], n).tolist())
                row["counts"][e] = len(got)
                if base is not None and e != ref:
                    only_e, only_ref = sorted(got - base), sorted(base - got)
                    row["vs_llguidance"][e] = {
                        "only_here": len(only_e), "only_llguidance": len(only_ref),
                        "examples_only_here": [show(vocab_bytes, i) for i in only_e[:6]],
                        "examples_only_llguidance": [show(vocab_bytes, i) for i in only_ref[:6]]}
            entry["positions"][str(k)] = row
        out[sname] = entry
    return out


def part_engines(args, model) -> dict:
    tok = model.tokenizer
    t0 = time.perf_counter()
    vocab_bytes = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    vocab_ms = (time.perf_counter() - t0) * 1000
    instances = {}
    for sname, spec in SCHEMAS.items():
        text = json.dumps(spec["instance"], separators=SEPARATORS)
        instances[sname] = (tok.encode(text, add_special=False), text)
    out = {"vocab_bytes_ms": vocab_ms,
           "instances": {s: {"text": t, "tokens": len(i), "ids": i} for s, (i, t) in instances.items()},
           "engines": {}}
    all_masks = {}
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        if cls.name not in args.engines:
            continue
        engine = cls(tok, vocab_bytes)
        log(f"{cls.name}: tokenizer setup {engine.setup_ms:.1f} ms")
        out["engines"][cls.name], all_masks[cls.name] = run_engine(engine, tok, vocab_bytes, instances, args.replays)
    out["agreement"] = agreement(all_masks, instances, vocab_bytes, tok.vocab_size)
    return out


# ---------------------------------------------------------------------------------------------- report


def table(result) -> str:
    lines = []
    imp = result.get("imports", {})
    eng = result.get("engines", {}).get("engines", {})
    step_ms = result.get("decode", {}).get("step_ms_median")
    if step_ms:
        lines.append(f"decode step: {step_ms:.2f} ms/token ({result['decode']['decode_tps_median']:.1f} tok/s)")
    lines.append(f"{'engine':<14}{'import s':>9}{'RSS MB':>8}{'setup ms':>10}  "
                 + "  ".join(f"{s + ': compile ms, mask µs med/p95, % step':<44}" for s in SCHEMAS))
    for name in ENGINES:
        i, e = imp.get(name, {}), eng.get(name)
        nan = float("nan")
        head = (f"{name:<14}{i.get('seconds_min', nan):>9.2f}{i.get('rss_growth_mb_median', nan):>8.0f}"
                f"{e['setup_ms'] if e else nan:>10.1f}  ")
        cells = []
        for s in SCHEMAS:
            if not e:
                cells.append(f"{'-':<44}")
                continue
            r = e["schemas"][s]
            frac = f"{100 * r['mask_us_median'] / 1000 / step_ms:.2f}%" if step_ms else "-"
            cells.append(f"{r['compile_ms_first']:>9.2f} {r['mask_us_median']:>8.1f}/{r['mask_us_p95']:<8.1f} {frac:>7}"
                         f"{'' if r['same_path_as_encode'] else ' *'}".ljust(44))
        lines.append(head + "  ".join(cells))
    for name in ENGINES:
        if name in eng:
            lines.append(f"{name}: first mask after compile (cold) µs: " + ", ".join(
                f"{s} {eng[name]['schemas'][s]['cold']['first_mask_us']:.0f}" for s in SCHEMAS))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replays", type=int, default=5, help="warm replays of each instance per engine")
    ap.add_argument("--decode-runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--import-reps", type=int, default=2, help="fresh subprocesses per engine import")
    ap.add_argument("--threads", type=int, default=None, help="model threads (default: every available core)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--parts", default="imports,decode,engines,constrained")
    ap.add_argument("--constrained-reps", type=int, default=2, help="repetitions of the constrained-decode part")
    ap.add_argument("--constrained-tokens", type=int, default=200)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.engines = args.engines.split(",")
    result = {"benchmark": "grammar_engines",
              "environment": environment(args.threads or len(os.sched_getaffinity(0))),
              "engine_versions": versions(("llguidance", "xgrammar", "outlines_core", "torch", "psutil")),
              "load_average": {},
              "settings": {"separators": SEPARATORS, "replays": args.replays, "decode_runs": args.decode_runs,
                           "schemas": {s: v["schema"] for s, v in SCHEMAS.items()}},
              "note": "shared 2-core machine: times move with other tenants' load (recorded per part); µs-scale "
                      "mask times are single-threaded"}
    model = None
    parts = args.parts.split(",")
    for name in parts:
        before = os.getloadavg()
        t0 = time.perf_counter()
        if name == "imports":
            result["imports"] = part_imports(args)
        else:
            if model is None:
                from cfm_runtime.runtime import load_model

                model = load_model(threads=args.threads) if args.threads else load_model()
                tok = model.tokenizer
                result["model"] = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                                   "eog_ids": sorted(tok.eog_ids),
                                   "empty_text_pieces": [i for i in range(tok.vocab_size) if not tok.token_bytes(i)],
                                   "torch_imported_by_load": "torch" in sys.modules}
            part = {"decode": part_decode, "engines": part_engines, "constrained": part_constrained}[name]
            result[name] = part(args, model)
            if name == "constrained":
                plot_constrained(result[name], Path(args.out or RESULTS) / "grammar_constrained.png")
        result["load_average"][name] = {"before_1_5_15": before, "after_1_5_15": os.getloadavg(),
                                        "seconds": round(time.perf_counter() - t0, 1)}
        path = save("grammar_engines", result, Path(args.out or RESULTS))
    if "decode" in result and "engines" in result:
        step_us = result["decode"]["step_ms_median"] * 1000
        for e in result["engines"]["engines"].values():
            for r in e["schemas"].values():
                r["mask_fraction_of_decode_step"] = r["mask_us_median"] / step_us
                r["mask_and_consume_fraction_of_decode_step"] = r["mask_and_consume_us_median"] / step_us
        path = save("grammar_engines", result, Path(args.out or RESULTS))
    print(table(result))
    log(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
