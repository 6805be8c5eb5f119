"""The neuron I/O path alone, cold page cache: reads and bytes per token, and time, for three policies.

Neuron selections are real: the oracle top-k (density 0.5 per layer) of the held-out texts'
activations, token by token. Policies:
- `per_neuron`: one pread per needed neuron, neurons in model order (no clustering, no cache);
- `clustered`: the pack's co-activation order, a layer's misses merged into runs (gaps <= 4), parallel;
- `clustered_window`: the same plus each layer's LRU cache of cold neurons kept across tokens.
The pack file is dropped from the page cache (posix_fadvise DONTNEED) before every token.

    python benchmarks/bench_sparse_io.py [--tokens 48] [--density 0.5] [--cache-rows 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, save  # noqa: E402


def selections(model, pack, density: float, n_tokens: int) -> list[list[np.ndarray]]:
    """Per token, per layer: sorted pack positions of the oracle top-k."""
    from cfm_runtime.sparse.stats import collect, topk_mask

    texts = json.loads((Path(__file__).parents[1] / "cfm_bench/data/eval_texts.json").read_text())["texts"]
    acts = collect(model, [model.tokenizer.encode(t) for t in texts.values()])
    out = []
    inv = [np.argsort(pack.order(i)) for i in range(pack.n_layers)]
    for t in range(min(n_tokens, acts.n_tokens)):
        out.append([np.sort(inv[i][np.nonzero(topk_mask(acts.acts[i][t:t + 1], density)[0].numpy())[0]])
                    for i in range(pack.n_layers)])
    return out


def run(policy: str, pack, sel, cache_rows: int, threads: int) -> dict:
    from cfm_runtime.sparse.io import BundleFile, NeuronCache, drop_page_cache, plan_runs

    f = BundleFile(pack.neurons_path, [pack.layer(i)["offset"] for i in range(pack.n_layers)], pack.bundle_bytes,
                   threads)
    row = np.zeros(pack.bundle_bytes, dtype=np.uint8)
    caches = [NeuronCache(cache_rows, pack.manifest["model"]["d_ff"], pack.bundle_bytes) for _ in range(pack.n_layers)]
    seconds = 0.0
    for step, layers in enumerate(sel, start=1):
        drop_page_cache(pack.neurons_path)
        t0 = time.perf_counter()
        for i, pos in enumerate(layers):
            ids = pack.order(i)[pos] if policy == "per_neuron" else pos
            if policy == "per_neuron":
                futures = [f.pool.submit(f.read_rows, i, int(p), [memoryview(row).cast("B")]) for p in np.sort(ids)]
                for fu in futures:
                    fu.result()
                continue
            if policy == "clustered_window":
                slots = caches[i].lookup(pos, step)
                miss = pos[slots < 0]
                new = caches[i].assign(miss, step)
                dest = {int(p): memoryview(caches[i].rows[s]).cast("B") for p, s in zip(miss, new) if s >= 0}
            else:
                miss, dest = pos, {}
            junk = memoryview(row).cast("B")
            f.read_scattered(i, plan_runs(miss, 4), lambda p: dest.get(p, junk))
        seconds += time.perf_counter() - t0
    n = len(sel)
    out = {"reads_per_token": round(f.io.reads / n, 1), "mb_per_token": round(f.io.bytes / n / 2**20, 3),
           "ms_per_token": round(1000 * seconds / n, 2)}
    f.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--cache-rows", type=int, default=256, help="cached cold neurons per layer (window policy)")
    ap.add_argument("--threads", type=int, default=8, help="reader threads")
    ap.add_argument("--pack", default=None, help="neuron pack directory (default: the model's, built if missing)")
    args = ap.parse_args()
    import cfm_runtime
    from cfm_runtime.runtime import ensure_pack
    from cfm_runtime.sparse import open_pack

    model = cfm_runtime.load_model(threads=2, weights="fp32")
    pack = open_pack((args.pack or ensure_pack(model.path)), verify=False)
    sel = selections(model, pack, args.density, args.tokens)
    needed = np.mean([sum(len(p) for p in layers) for layers in sel])
    results = {p: run(p, pack, sel, args.cache_rows, args.threads)
               for p in ("per_neuron", "clustered", "clustered_window")}
    data = {"environment": environment(2), "tokens": len(sel), "density": args.density,
            "cache_rows_per_layer": args.cache_rows, "needed_neurons_per_token": round(float(needed), 1),
            "needed_mb_per_token": round(float(needed) * pack.bundle_bytes / 2**20, 3), "policies": results}
    print(json.dumps(data, indent=2))
    save("sparse_io", data)


if __name__ == "__main__":
    main()
