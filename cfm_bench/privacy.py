"""What a center could recover from a split run's hidden states, and what private edge defences cost.

The center of a split run `[a, b)` receives the states leaving the edge's first layers `[0, a)` (one row
per position, prompt and answer tokens alike, since every generated token is fed back) and returns
the states that enter the edge's last layers `[b, n)`. It knows the public weights. Attacks, as such a
center would run them:

- **exact search** (`exact_search`): for each position, run candidate tokens after the (true) prefix
  through the public layers `[0, a)` in one batch and take the nearest state. Candidates are the learned
  inverter's top-k; the true token is scored too, so each position also yields an upper bound on a search
  over the whole vocabulary (the true token must beat every candidate scored) and a certificate of
  exactness (distance ~0: nothing else can be nearer).
- **learned inverter** (`Inverter`): ridge regression from the sent state to the token's embedding,
  trained only on public text through the public layers (with the defence's noise when the defence is
  noise, which a center may know); ranks the vocabulary by cosine.
- **logit lens** (`logit_lens`): the returned states pushed through the public last layers and head,
  against the tokens the edge generated.

Defences (`Defence`), run by the edge (`Edge`): more edge layers; a private LoRA brick on the edge's
layers (random with a bounded spectral norm, or trained on public text to keep the output while moving
the sent and returned states); Gaussian noise on the sent states relative to each row's norm. Utility:
perplexity and top-1 agreement against the undefended model on held-out texts (`utility`).

This is a measurement tool: nothing in `cfm_runtime` imports it. `run` produces the table that
`benchmarks/bench_privacy.py` and `cfm bench privacy` write (JSON and PNG).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata, resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cfm_runtime.bricks.lora import TARGET_KINDS, LoraPair, attach, attached, detach, set_weight
from cfm_runtime.errors import CfmError
from cfm_runtime.model import SpanCache

DATA = Path(__file__).resolve().parent / "data"
# What a user tells a personal assistant, in the style of the bricks' test data (tests/data/personal_facts.json):
# made-up people, kept here so that the benchmark runs from an installed wheel.
PERSONAL = (
    "My name is Lena Marwick. I grew up in the small town of Quillbury, on the coast of Norway.",
    "My dog is called Biscuit. Biscuit is a golden retriever who loves the beach.",
    "I work as a violin maker, and my favourite food is cardamom bread.",
    "What's my dog called?",
    "My doctor says my blood pressure is 150 over 95. Should I be worried about that?",
    "I live at 14 Harbour Lane, Quillbury, and my phone number is 0176 5550 1234.",
    "Remind me that my sister Ingrid's birthday is on the 3rd of March.",
    "I was diagnosed with type 1 diabetes in 2019 and I take insulin twice a day.",
    "Can you help me write an email to my landlord, Mr. Okafor, about the broken heating?",
    "My salary is 52,000 euros a year and my rent is 1,100 euros a month. Can I afford a car?",
    "My daughter Mia starts school at Northfield Primary in September.",
    "I am going through a divorce and I feel anxious most evenings. What can I do?",
)
BRICK_NAME = "__private_edge__"
EXACT_TOL = 1e-4  # relative distance under which a candidate's state is the sent state (fp32 rounding: ~1e-7)
MASSIVE_CHANNELS = 6  # channels left out of a row's norm for noise: the residual stream's outliers
STDLIB_FILES = ("textwrap.py", "argparse.py", "pathlib.py", "csv.py", "calendar.py", "statistics.py",
                "fractions.py", "heapq.py", "difflib.py", "shutil.py", "functools.py", "dataclasses.py",
                "enum.py", "random.py", "datetime.py", "json/decoder.py", "logging/handlers.py", "tarfile.py")


# ---------------------------------------------------------------- texts


@dataclass(frozen=True)
class Sample:
    """One chat turn as token ids; spans are [start, end) positions in `ids`."""

    kind: str  # "chat" | "code" | "personal"
    ids: tuple[int, ...]  # template, the user's message, the template's assistant header, the answer
    content: tuple[int, int]  # the user's message: what a prompt attack must recover
    answer: tuple[int, int] = (0, 0)  # the tokens the edge generated


def held_out_messages(per_kind: int = 12) -> dict[str, list[str]]:
    """User messages never used to train an inverter or a brick: chat prompts (shipped task prompts held out),
    code (the eval and calibration code, in pieces) and personal facts (`PERSONAL`)."""
    fn = resources.files("cfm_runtime").joinpath("data", "functions", "prompts.json")
    prompts = json.loads(fn.read_text())["functions"]
    chat = [q for kind in sorted(prompts)[:6] for q in prompts[kind][-2:]]  # the last two of six kinds
    code_text = json.loads((DATA / "eval_texts.json").read_text())["texts"]["code"]
    code_text += "\n\n" + resources.files("cfm_runtime").joinpath("data", "calib", "code.txt").read_text()
    code = _chunks(code_text, min_chars=60, max_lines=6)
    out = {"chat": chat[:per_kind], "code": code[:per_kind], "personal": list(PERSONAL[:per_kind])}
    short = [k for k, v in out.items() if len(v) < per_kind]
    if short:
        raise CfmError(f"only {', '.join(f'{len(out[k])} {k}' for k in short)} held-out texts; ask for "
                       f"--per-kind {min(len(v) for v in out.values())} or fewer")
    return out


def _chunks(text: str, min_chars: int, max_lines: int = 8) -> list[str]:
    """Blank-line separated blocks of at most `max_lines` lines, short ones merged into the next (an import
    line with the code after it)."""
    pieces = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        pieces += ["\n".join(lines[s:s + max_lines]) for s in range(0, len(lines), max_lines)]
    out, buf = [], ""
    for piece in pieces:
        buf = f"{buf}\n\n{piece}" if buf else piece
        if len(buf.strip()) >= min_chars:
            out.append(buf.strip("\n"))
            buf = ""
    return out + ([buf.strip("\n")] if buf.strip() else [])


def chat_sample(model, kind: str, message: str, max_content: int = 32) -> Sample:
    """The message in the chat template, cut to `max_content` tokens; the template's tokens are public."""
    tok = model.tokenizer
    content = tok.encode(message)[:max_content]
    marker = "\x00"  # splits the rendered template around the message
    before, after = tok.apply_chat_template([{"role": "user", "content": marker}]).split(marker)
    head, tail = tok.encode(before), tok.encode(after)
    ids = head + content + tail
    return Sample(kind, tuple(ids), (len(head), len(head) + len(content)))


def public_corpus(model, tokens: int = 40_000, window: int = 128) -> list[list[int]]:
    """Public text as windows of token ids, for the inverter and the trained brick: Python's standard
    library (code and English docstrings), the shipped calibration text (its code held out) and the
    shipped task prompts with the model's answers (the held-out ones left out)."""
    tok = model.tokenizer
    held = {m for ms in held_out_messages().values() for m in ms}
    texts = []
    calib = resources.files("cfm_runtime").joinpath("data", "calib")
    texts += [f.read_text() for f in sorted(calib.iterdir(), key=lambda f: f.name)
              if f.name.endswith(".txt") and f.name != "code.txt"]
    base = resources.files("cfm_runtime").joinpath("data", "functions")
    prompts = json.loads(base.joinpath("prompts.json").read_text())["functions"]
    answers = json.loads(base.joinpath("responses.json").read_text())["responses"]
    for kind in sorted(prompts):
        for q, r in zip(prompts[kind], answers.get(kind, [])):
            if q not in held:
                texts.append(tok.apply_chat_template([{"role": "user", "content": q},
                                                      {"role": "assistant", "content": r}],
                                                     add_generation_prompt=False))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [(stdlib / f).read_text(errors="replace")[:12_000] for f in STDLIB_FILES if (stdlib / f).is_file()]
    # interleave the sources' windows so that any prefix of the corpus mixes them
    per_text = [_windows(tok.encode(t), window) for t in texts]
    out = [w for k in range(max(map(len, per_text))) for ws in per_text if k < len(ws) for w in ws[k:k + 1]]
    return _take(out, tokens)


def _windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[s:s + window] for s in range(0, len(ids) - window // 2, window)]


def _take(windows: list[list[int]], tokens: int) -> list[list[int]]:
    out, n = [], 0
    for w in windows:
        if n >= tokens:
            break
        out.append(w)
        n += len(w)
    return out


# ---------------------------------------------------------------- defences and the edge


@dataclass(frozen=True)
class Defence:
    """What the edge does to its states. `noise`: std of Gaussian noise added to each sent row, relative to
    the row's norm (its outlier channels left out); `brick`: "random" (a LoRA whose update has spectral
    norm `brick_scale` x the base weight's on every linear of the edge's layers) or "trained" (see
    `train_private_brick`)."""

    name: str = "none"
    noise: float = 0.0
    brick: str | None = None
    brick_scale: float = 0.0  # random brick: ||delta W||_2 / ||W||_2
    brick_rank: int = 8
    brick_front: bool = True  # the brick covers the edge's first layers [0, a)
    brick_tail: bool = True  # ... and its last layers [b, n)
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.noise < 0:
            problems.append(f"noise must be >= 0, got {self.noise}")
        if self.brick not in (None, "random", "trained"):
            problems.append(f"brick {self.brick!r}: use None, 'random' or 'trained'")
        if self.brick == "random" and not self.brick_scale > 0:
            problems.append("a random brick needs brick_scale > 0 (its update's spectral norm relative to the base)")
        if self.brick and not (self.brick_front or self.brick_tail):
            problems.append("a brick must cover the front or the tail of the edge (brick_front/brick_tail)")
        if problems:
            raise CfmError("defence " + self.name + ": " + "; ".join(problems))


def edge_layers(split: tuple[int, int], n_layers: int, defence: Defence) -> list[int]:
    """The layers a defence's brick sits on: the edge's first and/or last layers."""
    a, b = split
    return ([*range(0, a)] if defence.brick_front else []) + ([*range(b, n_layers)] if defence.brick_tail else [])


def random_brick(transformer, layers: list[int], rank: int, scale: float, seed: int) -> dict[str, LoraPair]:
    """A random LoRA on every linear of `layers`: B A with Gaussian factors, scaled so that the update's
    spectral norm is `scale` times the base weight's (a bound on how far each linear moves)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for i in layers:
        for kind in TARGET_KINDS:
            w = transformer.get_submodule(f"layers.{i}.{kind}").weight  # [out, in]
            a = torch.randn(rank, w.shape[1], generator=gen)
            b = torch.randn(w.shape[0], rank, generator=gen)
            s = scale * torch.linalg.matrix_norm(w, 2) / torch.linalg.matrix_norm(b @ a, 2)
            pairs[f"layers.{i}.{kind}"] = LoraPair(a, b, float(s))
    return pairs


@contextmanager
def brick_on(transformer, pairs: dict[str, LoraPair] | None) -> Iterator[None]:
    """The private brick on the transformer for the duration (nothing if `pairs` is empty)."""
    if not pairs:
        yield
        return
    if attached(transformer):
        raise CfmError("take the bricks off the model before measuring privacy (the attacks need the public layers)")
    attach(transformer, BRICK_NAME, pairs)
    try:
        yield
    finally:
        detach(transformer, BRICK_NAME)


def row_scale(h: torch.Tensor) -> torch.Tensor:
    """[T, D] -> [T, 1]: each row's RMS over its channels without its `MASSIVE_CHANNELS` largest
    (a few channels of this model's residual stream reach 10^2-10^4 and would set the noise alone)."""
    mags = h.abs().sort(dim=-1).values[:, : h.shape[-1] - MASSIVE_CHANNELS]
    return mags.pow(2).mean(-1, keepdim=True).sqrt()


def noise_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """[n, d] standard normal rows; row t is the noise of position t (the same in a trace and in decoding)."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@dataclass
class Trace:
    """One sequence through a defended split run."""

    sent: torch.Tensor  # [T, D] what the center receives (after layers [0, a), the brick and the noise)
    returned: torch.Tensor  # [T, D] what the center sends back (after its layers [a, b))
    logits: torch.Tensor  # [T, V] the edge's output


class Edge:
    """The edge of a split run `(a, b)` under a defence, on the public transformer (fp32 reference)."""

    def __init__(self, model, split: tuple[int, int], defence: Defence = Defence(),
                 pairs: dict[str, LoraPair] | None = None):
        n = model.config.n_layers
        a, b = split
        if not 0 < a < b < n:
            raise CfmError(f"split {a}:{b}: need 0 < a < b < {n} (the edge keeps layers at both ends)")
        defence.check()
        if defence.brick and pairs is None:
            raise CfmError(f"defence {defence.name}: give the brick's LoRA pairs (random_brick or train_private_brick)")
        self.model, self.t, self.split, self.defence, self.pairs = model, model.transformer, split, defence, pairs

    @torch.inference_mode()
    def trace(self, ids: list[int] | tuple[int, ...], noise_seed: int = 0) -> Trace:
        """Teacher-forced run of `ids` (equal to decoding them one by one: causal, noise fixed per position)."""
        cache = self.t.new_cache(0, self.model.config.n_layers, len(ids))
        with brick_on(self.t, self.pairs):
            return self._step(list(ids), cache, noise_seed)

    def _step(self, ids: list[int], cache: SpanCache, noise_seed: int) -> Trace:
        """New positions `ids` after those in `cache`, through every layer (the brick already on)."""
        t, (a, b), n = self.t, self.split, self.model.config.n_layers
        start = cache.offset
        h = t.forward_span(t.embed(torch.tensor([ids])), 0, a, [cache])[0]
        if self.defence.noise:  # rows of the noise are fixed per position, whatever the step
            z = noise_rows(start + len(ids), h.shape[1], noise_seed)[start:]
            h = h + self.defence.noise * row_scale(h) * z
        back = t.forward_span(h[None], a, b, [cache])
        logits = t.head(t.forward_span(back, b, n, [cache]))[0]
        return Trace(h, back[0], logits)

    @torch.inference_mode()
    def generate(self, prompt: list[int] | tuple[int, ...], n_tokens: int, noise_seed: int = 0) -> list[int]:
        """Greedy answer of the defended edge, decoded step by step with its caches (stops at end of turn)."""
        eos, out = self.model.tokenizer.eos_id, []
        cache = self.t.new_cache(0, self.model.config.n_layers, len(prompt) + n_tokens)
        with brick_on(self.t, self.pairs):
            logits = self._step(list(prompt), cache, noise_seed).logits
            for _ in range(n_tokens):
                out.append(int(logits[-1].argmax()))
                if out[-1] == eos or len(out) == n_tokens:
                    break
                logits = self._step(out[-1:], cache, noise_seed).logits
        return out


# ---------------------------------------------------------------- learned inverter


def _features(h: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D + 1]: unit-RMS rows (the norm carries little about the token) and a bias column."""
    h = h / h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    return torch.cat([h, torch.ones(h.shape[0], 1)], -1)


@dataclass
class Inverter:
    """Sent state -> token: ridge regression onto the token's embedding, vocabulary ranked by cosine."""

    weight: torch.Tensor  # [D + 1, D]
    embeddings: torch.Tensor  # [V, D], unit rows

    @classmethod
    def fit(cls, states: torch.Tensor, targets: torch.Tensor, embeddings: torch.Tensor,
            ridge: float = 1.0) -> "Inverter":
        """states [N, D] at the split, targets [N] their tokens, embeddings [V, D] the public table."""
        x = _features(states.float())
        y = embeddings[targets]
        w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ y)
        return cls(w, F.normalize(embeddings, dim=-1))

    def scores(self, states: torch.Tensor, chunk: int = 512) -> Iterator[torch.Tensor]:
        """[N, D] -> chunks of [n, V] cosine scores."""
        for s in range(0, states.shape[0], chunk):
            yield F.normalize(_features(states[s:s + chunk]) @ self.weight, dim=-1) @ self.embeddings.T

    def top(self, states: torch.Tensor, k: int) -> torch.Tensor:
        """[N, D] -> [N, k] most likely tokens, best first."""
        return torch.cat([s.topk(k, dim=-1).indices for s in self.scores(states)])


@torch.inference_mode()
def public_states(model, windows: list[list[int]], depths: tuple[int, ...], batch: int = 8) -> tuple[dict, torch.Tensor]:
    """States after the public layers [0, a) for every a in `depths` at every window position but the first
    (massive activations; the first position of a chat is public), and their tokens."""
    t, top = model.transformer, max(depths)
    out = {a: [] for a in depths}
    targets = []
    for s in range(0, len(windows), batch):
        group = [w for w in windows[s:s + batch]]
        width = min(map(len, group))
        x = torch.tensor([w[:width] for w in group])  # [B, T]
        caches = [t.new_cache(0, top, width) for _ in group]
        h, prev = t.embed(x), 0
        for a in sorted(depths):
            h = t.forward_span(h, prev, a, caches)
            prev = a
            out[a].append(h[:, 1:].reshape(-1, h.shape[-1]))
        targets.append(x[:, 1:].reshape(-1))
    return {a: torch.cat(v) for a, v in out.items()}, torch.cat(targets)


def train_inverter(model, states: torch.Tensor, targets: torch.Tensor, noise: float = 0.0, seed: int = 0) -> Inverter:
    """The inverter a center trains on public states, with the defence's noise if it knows it."""
    if noise:
        states = states + noise * row_scale(states) * noise_rows(states.shape[0], states.shape[1], seed + 7919)
    return Inverter.fit(states, targets, model.transformer.embed_tokens.weight.detach())


# ---------------------------------------------------------------- exact search


def candidate_states(t, prefix: SpanCache, pos: int, cand: torch.Tensor, depth: int) -> torch.Tensor:
    """States after the public layers [0, depth) of each candidate token at position `pos`, after the
    prefix whose keys and values `prefix` holds: [K] token ids -> [K, D]. One batched step per layer;
    the K candidates share the prefix (attention to it is one matmul, plus each candidate's own key)."""
    x = t.embed_tokens.weight[cand]  # [K, D]
    k_count = x.shape[0]
    for i in range(depth):
        layer = t.layers[i]
        at = layer.self_attn
        hkv, hd = at.n_kv_heads, at.head_dim
        g = at.n_heads // hkv  # query heads per kv head
        xn = layer.input_layernorm(x)
        q = t.rotary.apply(at.q_proj(xn).view(k_count, at.n_heads, 1, hd), pos).view(k_count, hkv, g, hd)
        k = t.rotary.apply(at.k_proj(xn).view(k_count, hkv, 1, hd), pos)  # [K, Hkv, 1, hd]
        v = at.v_proj(xn).view(k_count, hkv, 1, hd)
        keys = torch.from_numpy(prefix[i].k[:, :pos])  # [Hkv, pos, hd], already rotated (numpy cache: a view)
        values = torch.from_numpy(prefix[i].v[:, :pos])
        scores = torch.cat([torch.einsum("khgd,hpd->khgp", q, keys), (q * k).sum(-1, keepdim=True)], -1)
        p = torch.softmax(scores / math.sqrt(hd), -1)  # [K, Hkv, g, pos + 1]
        out = torch.einsum("khgp,hpd->khgd", p[..., :-1], values) + p[..., -1:] * v
        x = x + at.o_proj(out.reshape(k_count, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


@dataclass
class SearchResult:
    """Per position of one sequence: what the search concluded."""

    positions: list[int]
    guess: list[int]  # nearest candidate (the attack's answer; the true token is not offered to it)
    true_nearest: list[bool]  # the true token nearer than every candidate: needed for a full-vocabulary hit
    exact: list[bool]  # the true token's state equals the sent state: a full search finds it, certainly
    in_candidates: list[bool]  # the true token among the candidates


@torch.inference_mode()
def exact_search(model, ids: list[int] | tuple[int, ...], sent: torch.Tensor, depth: int, positions: list[int],
                 candidates: torch.Tensor, chunk: int = 1024) -> SearchResult:
    """Exact-search attack on `positions` of one sequence: each position's candidates ([P, K] token ids) run
    after the true prefix (an attacker who got the prefix right; a real one carries its own errors forward)
    through the public layers [0, depth), and the nearest state to the sent row wins (Euclidean: the
    maximum-likelihood choice under Gaussian noise). The true token is scored apart, as the referee."""
    t = model.transformer
    cache = t.new_cache(0, depth, len(ids))
    t.forward_span(t.embed(torch.tensor([list(ids)])), 0, depth, [cache])  # the public prefix's keys/values
    res = SearchResult([], [], [], [], [])
    for p, cand in zip(positions, candidates):
        true = int(ids[p])
        full = torch.cat([torch.tensor([true]), cand[cand != true]])
        d = torch.cat([(candidate_states(t, cache, p, full[s:s + chunk], depth) - sent[p]).norm(dim=-1)
                       for s in range(0, len(full), chunk)])
        offered = d[1:]
        nearest = int(full[1 + int(offered.argmin())]) if len(offered) else -1
        in_cand = bool((cand == true).any())
        guess = true if in_cand and (len(offered) == 0 or d[0] <= offered.min()) else nearest
        res.positions.append(p)
        res.guess.append(guess)
        res.true_nearest.append(bool(len(offered) == 0 or d[0] < offered.min()))
        res.exact.append(bool(d[0] <= EXACT_TOL * sent[p].norm()))
        res.in_candidates.append(in_cand)
    return res


@torch.inference_mode()
def full_search(model, ids, sent: torch.Tensor, depth: int, position: int, chunk: int = 4096) -> int:
    """The nearest token over the whole vocabulary at one position (slow: the check of the bound)."""
    t = model.transformer
    cache = t.new_cache(0, depth, len(ids))
    t.forward_span(t.embed(torch.tensor([list(ids)])), 0, depth, [cache])
    best, best_d = -1, float("inf")
    for s in range(0, model.config.vocab_size, chunk):
        cand = torch.arange(s, min(s + chunk, model.config.vocab_size))
        d = (candidate_states(t, cache, position, cand, depth) - sent[position]).norm(dim=-1)
        if float(d.min()) < best_d:
            best, best_d = int(cand[int(d.argmin())]), float(d.min())
    return best


# ---------------------------------------------------------------- logit lens


@torch.inference_mode()
def logit_lens(model, returned: torch.Tensor, b: int) -> torch.Tensor:
    """[T, D] returned states -> [T] the public last layers' and head's next token at each position."""
    t, n = model.transformer, model.config.n_layers
    if attached(t):
        raise CfmError("take the bricks off the model before the logit lens (it runs the public layers)")
    h = t.forward_span(returned[None], b, n, [t.new_cache(b, n, returned.shape[0])])
    return t.head(h)[0].argmax(-1)


# ---------------------------------------------------------------- utility


def utility_texts(model, max_tokens: int = 128) -> list[list[int]]:
    """The held-out evaluation texts (prose, code, math, science) as token ids, `max_tokens` each."""
    texts = json.loads((DATA / "eval_texts.json").read_text())["texts"]
    return [model.tokenizer.encode(texts[k])[:max_tokens] for k in sorted(texts)]


@torch.inference_mode()
def utility(edge: Edge, texts: list[list[int]], base: list[torch.Tensor]) -> dict:
    """Perplexity of the defended edge on `texts` and its top-1 agreement and mean KL with the undefended
    model's logits `base` ([T, V] per text); every position but the first predicts its successor."""
    nll, base_nll, agree, kl, count = 0.0, 0.0, 0, 0.0, 0
    for k, (ids, ref) in enumerate(zip(texts, base)):
        logits = edge.trace(ids, noise_seed=10_000 + k).logits
        target = torch.tensor(ids[1:])
        nll += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
        base_nll += float(F.cross_entropy(ref[:-1], target, reduction="sum"))
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        kl += float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="sum"))
        count += len(ids)
    n_pred = count - len(texts)
    ppl, base_ppl = math.exp(nll / n_pred), math.exp(base_nll / n_pred)
    return {"perplexity": round(ppl, 3), "base_perplexity": round(base_ppl, 3),
            "perplexity_change": round(ppl / base_ppl - 1, 4), "top1_agreement": round(agree / count, 4),
            "mean_kl": round(kl / count, 4), "positions": count}


# ---------------------------------------------------------------- trained private brick


@dataclass(frozen=True)
class BrickTraining:
    """Training of the private brick on public text: KL to the undefended model on every position, plus
    two hinge terms that are zero once the attacks fail: the sent state nearer (relative distance) to the
    public state of another token than to its own (`front`), and the public last layers' argmax on the
    returned state not the undefended model's (`tail`)."""

    steps: int = 80
    lr: float = 2e-3
    rank: int = 8
    alpha: float = 16.0
    batch: int = 2  # windows per step
    window: int = 32  # tokens per window
    front_weight: float = 1.0
    tail_weight: float = 1.0
    competitors: int = 8  # tokens whose public states the sent state should be nearer to (inverter's top)
    margin: float = 0.05  # relative squared distance (front) and logit (tail) margins
    seed: int = 0


def _trainable_pairs(transformer, layers: list[int], cfg: BrickTraining, gen: torch.Generator) -> dict[str, LoraPair]:
    """A uniform (as PEFT initialises it) and B zero: training starts from the undefended model."""
    pairs = {}
    for i in layers:
        for kind in TARGET_KINDS:
            lin = transformer.get_submodule(f"layers.{i}.{kind}")
            bound = 1 / math.sqrt(lin.in_features)
            a = (torch.rand(cfg.rank, lin.in_features, generator=gen) * 2 - 1) * bound
            b = torch.zeros(lin.out_features, cfg.rank)
            pairs[f"layers.{i}.{kind}"] = LoraPair(torch.nn.Parameter(a), torch.nn.Parameter(b), cfg.alpha / cfg.rank)
    return pairs


@torch.inference_mode()
def _targets(model, windows: list[list[int]], a: int, inverter: Inverter, k: int) -> list[tuple]:
    """Per window: the undefended final states [T, D], the public sent states [T, D] and the public states of
    `k` competitor tokens at every position [T, k, D] (position 0 left out: it is public)."""
    t, n = model.transformer, model.config.n_layers
    out = []
    for ids in windows:
        cache = t.new_cache(0, n, len(ids))
        sent = t.forward_span(t.embed(torch.tensor([ids])), 0, a, [cache])
        final = t.forward_span(sent, a, n, [cache])[0]
        top = inverter.top(sent[0], k + 1)
        comp = torch.zeros(len(ids), k, sent.shape[-1])
        for p in range(1, len(ids)):
            cand = top[p][top[p] != ids[p]][:k]
            comp[p, : len(cand)] = candidate_states(t, cache, p, cand, a)
        out.append((final, sent[0], comp))
    return out


def train_private_brick(model, split: tuple[int, int], windows: list[list[int]], inverter: Inverter,
                        cfg: BrickTraining = BrickTraining(), defence: Defence = Defence(brick="trained"),
                        log: Callable[[str], None] | None = None) -> tuple[dict[str, LoraPair], list[dict]]:
    """Train the private brick on the edge's layers of `split` (front and/or tail as `defence` says) on
    public `windows`; returns its pairs (model layout, plain tensors) and the loss history."""
    t, n, a = model.transformer, model.config.n_layers, split[0]
    if attached(t):
        raise CfmError("take the bricks off the model before training a private brick")
    windows = [w[: cfg.window] for w in windows if len(w) >= cfg.window]
    if len(windows) < cfg.batch:
        raise CfmError(f"{len(windows)} public windows of {cfg.window} tokens; give at least {cfg.batch}")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    targets = _targets(model, windows, a, inverter, cfg.competitors)
    pairs = _trainable_pairs(t, edge_layers(split, n, defence), cfg, gen)
    opt = torch.optim.Adam([p for pair in pairs.values() for p in (pair.a, pair.b)], lr=cfg.lr)
    rot = t.rotary  # tables grown under inference_mode cannot enter autograd; plain copies can
    if rot.cos.is_inference():
        rot.cos, rot.sin = rot.cos.clone(), rot.sin.clone()
    history = []
    attach(t, BRICK_NAME, pairs)
    try:
        for step in range(cfg.steps):
            pick = torch.randperm(len(windows), generator=gen)[: cfg.batch].tolist()
            parts = _brick_losses(model, split, [windows[i] for i in pick], [targets[i] for i in pick], cfg)
            loss = parts["kl"] + cfg.front_weight * parts["front"] + cfg.tail_weight * parts["tail"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({k: round(float(v.detach()), 4) for k, v in parts.items()})
            if log and (step % 10 == 0 or step == cfg.steps - 1):
                log(f"brick step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items()))
    finally:
        detach(t, BRICK_NAME)
    return {k: LoraPair(p.a.detach().clone(), p.b.detach().clone(), p.scale) for k, p in pairs.items()}, history


def _brick_losses(model, split, windows: list[list[int]], targets: list[tuple], cfg: BrickTraining) -> dict:
    t, n, (a, b) = model.transformer, model.config.n_layers, split
    x = torch.tensor(windows)  # [B, T]
    caches = [t.new_cache(0, n, x.shape[1]) for _ in windows]
    sent = t.forward_span(t.embed(x), 0, a, caches)  # [B, T, D] with the brick on the front
    back = t.forward_span(sent, a, b, caches)  # the center's public layers
    final = t.forward_span(back, b, n, caches)
    final_base = torch.stack([f for f, _, _ in targets])
    logp = F.log_softmax(t.head(final), -1)
    base_logp = F.log_softmax(t.head(final_base), -1)
    kl = F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1).mean()
    # front: relative squared distances of the sent state to the true token's and the competitors' public states
    pub = torch.stack([s for _, s, _ in targets])[:, 1:]  # [B, T-1, D]
    comp = torch.stack([c for _, _, c in targets])[:, 1:]  # [B, T-1, k, D]
    s = sent[:, 1:]
    scale = pub.pow(2).sum(-1)
    d_true = (s - pub).pow(2).sum(-1) / scale
    d_comp = (s[:, :, None] - comp).pow(2).sum(-1).min(-1).values / scale
    front = F.relu(d_comp - d_true + cfg.margin).mean()  # zero once another token is nearer by the margin
    # tail: the public last layers (the brick switched off) on the returned states
    set_weight(t, BRICK_NAME, 0.0)
    try:
        lens = t.head(t.forward_span(back, b, n, [t.new_cache(b, n, x.shape[1]) for _ in windows]))
    finally:
        set_weight(t, BRICK_NAME, 1.0)
    y = base_logp.argmax(-1, keepdim=True)  # [B, T, 1]
    own = lens.gather(-1, y)[..., 0]
    other = lens.scatter(-1, y, float("-inf")).max(-1).values
    tail = F.relu(own - other + cfg.margin).mean()
    return {"kl": kl, "front": front, "tail": tail}


# ---------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class Settings:
    per_kind: int = 12  # held-out messages per kind (chat, code, personal)
    max_content: int = 32  # tokens of each message kept
    answer_tokens: int = 12  # greedy answer tokens generated per message
    fronts: tuple = (1, 2, 4, 8)  # undefended splits (k, n - k): k edge layers before and after the center
    split: tuple = (2, 28)  # the center's default span: utility's reference run
    defence_splits: tuple = ((2, 28), (8, 22))  # where the defences are measured
    noises: tuple = (0.1, 0.3, 1.0, 3.0)
    random_bricks: tuple = (0.2, 0.5)  # spectral norm of the update relative to the base weight's
    trained_brick: bool = True
    brick: BrickTraining = field(default_factory=BrickTraining)
    corpus_tokens: int = 20_000  # public text for the inverter
    brick_windows: int = 120  # public windows the trained brick sees
    candidates: int = 128  # inverter's top-k scored by the exact search at every position
    verify_positions: int = 4  # full-vocabulary searches per defended configuration (the bound's check)
    threads: int | None = None
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.per_kind < 1 or self.max_content < 1 or self.answer_tokens < 0:
            problems.append("per_kind and max_content must be >= 1, answer_tokens >= 0")
        if any(not 1 <= k < 15 for k in self.fronts):
            problems.append(f"fronts {self.fronts}: each must be between 1 and 14 (k layers at each end)")
        if any(x < 0 for x in self.noises) or any(x <= 0 for x in self.random_bricks):
            problems.append("noise levels must be >= 0 and random brick scales > 0")
        if self.candidates < 1 or self.verify_positions < 0:
            problems.append("candidates must be >= 1 and verify_positions >= 0")
        if problems:
            raise CfmError("privacy benchmark: " + "; ".join(problems))


QUICK = Settings(per_kind=2, max_content=16, answer_tokens=4, fronts=(2,), defence_splits=((2, 28),), noises=(0.3,),
                 random_bricks=(),
                 trained_brick=False, corpus_tokens=4_000, candidates=64, verify_positions=1)
# The grid run for benchmarks/results/privacy.json on 2 shared cores (~30 min): every split of `Settings`, the
# defences at 2:28 only, fewer and shorter texts, 32 candidates, a shorter brick training; see CUTS.
BUDGET = Settings(per_kind=3, max_content=20, answer_tokens=6, defence_splits=((2, 28),), noises=(0.1, 1.0),
                  random_bricks=(0.05, 0.2), corpus_tokens=8_000, brick_windows=60, candidates=32,
                  verify_positions=2, brick=BrickTraining(steps=40))
CUTS = ("Defences are measured at split 2:28 only (not at 1, 4 or 8 edge layers); 3 held-out texts per kind "
        "(20 prompt tokens, 6 answer tokens each) instead of 12 (32, 12); the exact search scores the inverter's "
        "top 32 candidates (its bound is looser, i.e. higher, with fewer); the trained brick gets 40 steps on 60 "
        "public windows. Why: the fp32 attacks on this 2-core machine shared with other jobs (load average "
        "recorded in environment) would take several hours for the full grid.")
TARGET = {"prompt": 0.10, "answer": 0.10, "perplexity_change": 0.03}
KINDS = ("chat", "code", "personal")


def _log(msg: str) -> None:
    import sys

    print(f"[bench privacy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rate(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


def attack_sample(model, edge: Edge, sample: Sample, inverter: Inverter, k: int, seed: int) -> dict:
    """Every attack on one sample: per position, hit or miss, for the prompt's content and the answer."""
    a, b = edge.split
    tr = edge.trace(sample.ids, noise_seed=seed)
    out = {}
    for part, (s, e) in (("prompt", sample.content), ("answer", sample.answer)):
        pos = list(range(s, e))
        if not pos:
            continue
        truth = [sample.ids[p] for p in pos]
        cand = inverter.top(tr.sent[pos], k)
        r = exact_search(model, sample.ids, tr.sent, a, pos, cand)
        hits = {"exact_search": r.true_nearest, "exact_search_pruned": [g == y for g, y in zip(r.guess, truth)],
                "certified_exact": [x and n for x, n in zip(r.exact, r.true_nearest)],
                "inverter": [int(c[0]) == y for c, y in zip(cand, truth)]}
        if part == "answer":
            lens = logit_lens(model, tr.returned, b)
            hits["logit_lens"] = [int(lens[p - 1]) == y for p, y in zip(pos, truth)]
        real = [h for name, h in hits.items() if name not in ("exact_search", "certified_exact")]
        hits["any_attack"] = [any(col) for col in zip(*real)]  # attacks a center can run (not the bound)
        out[part] = hits
    return out


def _aggregate(per_sample: list[tuple[str, dict]]) -> dict:
    """Rates over all positions and per kind, for the prompt and the answer."""
    out = {}
    for part in ("prompt", "answer"):
        pooled: dict[str, list[bool]] = {}
        by_kind: dict[str, dict[str, list[bool]]] = {}
        for kind, hits in per_sample:
            for name, h in hits.get(part, {}).items():
                pooled.setdefault(name, []).extend(h)
                by_kind.setdefault(kind, {}).setdefault(name, []).extend(h)
        if pooled:
            n = len(next(iter(pooled.values())))
            out[part] = {"positions": n, **{k: _rate(v) for k, v in pooled.items()},
                         "by_kind": {kind: {"positions": len(next(iter(d.values()))), **{k: _rate(v) for k, v in d.items()}}
                                     for kind, d in by_kind.items()}}
    return out


def answered(edge: Edge, prompts: list[Sample], n_tokens: int) -> list[Sample]:
    """The prompts with the defended edge's greedy answers appended (noise seeded per prompt)."""
    out = []
    for j, p in enumerate(prompts):
        answer = edge.generate(p.ids, n_tokens, noise_seed=j) if n_tokens else []
        out.append(replace(p, ids=p.ids + tuple(answer), answer=(len(p.ids), len(p.ids) + len(answer))))
    return out


def measure_config(model, name: str, split: tuple[int, int], defence: Defence, pairs, prompts: list[Sample],
                   inverter: Inverter, texts: list[list[int]], base: list[torch.Tensor], s: Settings,
                   samples: list[Sample] | None = None) -> dict:
    """One row of the table: the defended edge's answers (or `samples` already answered: an undefended split
    answers as the whole model does), every attack on prompts and answers, utility, and a few
    full-vocabulary searches where the exact search's bound is not certified."""
    t0 = time.perf_counter()
    edge = Edge(model, split, defence, pairs)
    samples = samples or answered(edge, prompts, s.answer_tokens)
    per_sample = [(smp.kind, attack_sample(model, edge, smp, inverter, s.candidates, j)) for j, smp in enumerate(samples)]
    row = {"name": name, "split": list(split), "edge_layers": [split[0], model.config.n_layers - split[1]],
           "defence": asdict(defence), **_aggregate(per_sample), "utility": utility(edge, texts, base)}
    row["full_vocabulary_check"] = verify_bound(model, edge, samples, per_sample, s.verify_positions)
    row["meets_target"] = meets_target(row)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def verify_bound(model, edge: Edge, samples: list[Sample], per_sample: list, n: int) -> dict | None:
    """Full-vocabulary searches on `n` prompt positions spread over the samples, where the bound is not
    certified (the true token's state is not the sent state): the actual exact-search result there."""
    todo = [(j, p) for j, smp in enumerate(samples) for i, p in enumerate(range(*smp.content))
            if not per_sample[j][1]["prompt"]["certified_exact"][i]]
    if not todo or not n:
        return None
    step = max(1, len(todo) // n)
    picked = todo[::step][:n]
    hits, bound = [], []
    for j, p in picked:
        smp = samples[j]
        tr = edge.trace(smp.ids, noise_seed=j)
        hits.append(full_search(model, smp.ids, tr.sent, edge.split[0], p) == smp.ids[p])
        bound.append(per_sample[j][1]["prompt"]["exact_search"][p - smp.content[0]])
    return {"positions": len(picked), "recovered": _rate(hits), "bound_on_same_positions": _rate(bound)}


def meets_target(row: dict) -> bool:
    """Both attacks at most 10% of prompt and of answer tokens, at most +3% perplexity."""
    worst_prompt = max(row["prompt"]["exact_search"], row["prompt"]["inverter"])
    ans = row.get("answer")
    worst_answer = max(ans["exact_search"], ans["inverter"], ans["logit_lens"]) if ans else 0.0
    return (worst_prompt <= TARGET["prompt"] and worst_answer <= TARGET["answer"]
            and row["utility"]["perplexity_change"] <= TARGET["perplexity_change"])


def worst_recovery(row: dict) -> float:
    """The largest recovery rate of any attack (the exact search's bound included), prompt or answer."""
    rates = [row["prompt"][k] for k in ("exact_search", "inverter")]
    if "answer" in row:
        rates += [row["answer"][k] for k in ("exact_search", "inverter", "logit_lens")]
    return max(rates)


def mean_recovery(row: dict) -> float:
    """The mean of the attacks' recovery rates (exact search's bound, inverter; logit lens on answers)."""
    rates = [row["prompt"][k] for k in ("exact_search", "inverter")]
    if "answer" in row:
        rates += [row["answer"][k] for k in ("exact_search", "inverter", "logit_lens")]
    return sum(rates) / len(rates)


def rank(row: dict) -> tuple[float, float]:
    """Lower is more private: the worst attack first, then the attacks' mean."""
    return worst_recovery(row), mean_recovery(row)


def summarize(rows: list[dict]) -> dict:
    """The target's verdict, the best trade-off within the perplexity budget, and the edge-layer table the
    planner quotes."""
    within = [r for r in rows if r["utility"]["perplexity_change"] <= TARGET["perplexity_change"]]
    best = min(within, key=rank) if within else None
    lowest = min(rows, key=rank)
    undefended = {r["edge_layers"][0]: r for r in rows if r["defence"]["name"] == "none"}
    return {
        "target": TARGET, "target_met": any(r["meets_target"] for r in rows),
        "meeting_target": [r["name"] for r in rows if r["meets_target"]],
        "best_within_perplexity_budget": best and _brief(best),
        "lowest_recovery_any_cost": _brief(lowest),
        "by_edge_layers": {k: {"prompt_exact_search": r["prompt"]["exact_search"],
                               "prompt_inverter": r["prompt"]["inverter"],
                               "answer_exact_search": r.get("answer", {}).get("exact_search"),
                               "answer_inverter": r.get("answer", {}).get("inverter"),
                               "answer_logit_lens": r.get("answer", {}).get("logit_lens")}
                           for k, r in sorted(undefended.items())},
    }


def _brief(row: dict) -> dict:
    return {"name": row["name"], "split": row["split"], "defence": row["defence"],
            "prompt_exact_search": row["prompt"]["exact_search"], "prompt_inverter": row["prompt"]["inverter"],
            "answer_logit_lens": row.get("answer", {}).get("logit_lens"),
            "worst_recovery": worst_recovery(row), "mean_recovery": round(mean_recovery(row), 4),
            "perplexity_change": row["utility"]["perplexity_change"]}


def write_package_data(result: dict) -> Path:
    """The summary the planner quotes (`cfm_runtime.split.planner.privacy_note`), with where it came from,
    as cfm_runtime/data/privacy.json."""
    env = result["environment"]
    data = {"source": "benchmarks/results/privacy.json (python benchmarks/bench_privacy.py --budget)",
            "model": env["model"], "time": env["time"], **result["summary"]}
    path = Path(str(resources.files("cfm_runtime").joinpath("data", "privacy.json")))
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def defences(model, s: Settings, split: tuple[int, int], inverter: Inverter, log) -> list[tuple]:
    """(name, defence, brick pairs, notes) of every defended configuration at `split`."""
    n = model.config.n_layers
    out = [(f"noise {x:g}", Defence(f"noise {x:g}", noise=x, seed=s.seed), None, {}) for x in s.noises]
    for scale in s.random_bricks:
        d = Defence(f"random brick {scale:g}", brick="random", brick_scale=scale, seed=s.seed)
        out.append((d.name, d, random_brick(model.transformer, edge_layers(split, n, d), d.brick_rank, scale,
                                            s.seed), {}))
    if s.trained_brick:
        d = Defence("trained brick", brick="trained", brick_rank=s.brick.rank, seed=s.seed)
        t0 = time.perf_counter()
        windows = public_corpus(model, tokens=s.brick_windows * s.brick.window, window=s.brick.window)
        pairs, history = train_private_brick(model, split, windows, inverter, s.brick, d, log)
        out.append((d.name, d, pairs, {"training": asdict(s.brick), "training_seconds": round(time.perf_counter() - t0, 1),
                                       "loss_first": history[0], "loss_last_10": _mean_losses(history[-10:])}))
    return out


def _mean_losses(history: list[dict]) -> dict:
    return {k: round(sum(h[k] for h in history) / len(history), 4) for k in history[0]}


def run(s: Settings, out_dir: Path, model_path=None, log: Callable[[str], None] = _log) -> dict:
    """Measure every configuration; write privacy.json and privacy.png to `out_dir`; returns the result."""
    from cfm_runtime import LoadOptions, load_model

    s.check()
    t_start, load_start = time.perf_counter(), os.getloadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path, LoadOptions(threads=s.threads, weights="fp32", progress=False))
    n = model.config.n_layers
    torch.manual_seed(s.seed)
    prompts = [chat_sample(model, kind, m, s.max_content)
               for kind, ms in held_out_messages(s.per_kind).items() for m in ms]
    texts = utility_texts(model)
    base = [Edge(model, s.split).trace(ids).logits for ids in texts]
    depths = tuple(sorted(set(s.fronts) | {a for a, _ in s.defence_splits}))
    log(f"{len(prompts)} held-out prompts; public states at depths {depths} from {s.corpus_tokens} public tokens")
    states, targets = public_states(model, public_corpus(model, s.corpus_tokens), depths)
    inverters = {a: train_inverter(model, states[a], targets) for a in depths}
    plain = answered(Edge(model, s.split), prompts, s.answer_tokens)  # fp32 spans: every split answers alike
    rows = []
    for k in s.fronts:
        rows.append(measure_config(model, f"edge {k}+{k}", (k, n - k), Defence(), None, prompts, inverters[k],
                                   texts, base, s, plain))
        log(_describe(rows[-1]))
    for a, b in s.defence_splits:
        for name, d, pairs, notes in defences(model, s, (a, b), inverters[a], log):
            inv = train_inverter(model, states[a], targets, noise=d.noise, seed=s.seed) if d.noise else inverters[a]
            rows.append(measure_config(model, f"{a}:{b} {name}", (a, b), d, pairs, prompts, inv, texts, base, s) | notes)
            log(_describe(rows[-1]))
    result = {"benchmark": "privacy", "settings": asdict(s), "environment": environment(model, t_start, load_start),
              "summary": summarize(rows), "rows": rows, "notes": NOTES + ([CUTS] if s == BUDGET else [])}
    (out_dir / "privacy.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    result["plots"] = [plot(result, out_dir / "privacy.png").name]
    (out_dir / "privacy.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    return result


def _describe(row: dict) -> str:
    p, a, u = row["prompt"], row.get("answer", {}), row["utility"]
    return (f"{row['name']}: prompt exact {p['exact_search']:.3f} (pruned {p['exact_search_pruned']:.3f}) inverter "
            f"{p['inverter']:.3f} on {p['positions']}; answer exact {a.get('exact_search', 0):.3f} lens "
            f"{a.get('logit_lens', 0):.3f} on {a.get('positions', 0)}; ppl {u['perplexity_change']:+.2%} "
            f"top-1 {u['top1_agreement']:.3f} ({row['seconds']} s)")


def environment(model, t_start: float, load_start: tuple) -> dict:
    versions = {}
    for pkg in ("torch", "numpy", "cfm-runtime"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"machine": platform.machine(), "python": platform.python_version(), "versions": versions,
            "threads": torch.get_num_threads(), "cores_available": len(os.sched_getaffinity(0)),
            "model": model.config.name, "n_layers": model.config.n_layers,
            "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


NOTES = [
    "Positions: every number is a fraction of the positions named beside it (prompt: the user's message tokens; "
    "answer: the tokens the defended edge generated greedily). Template tokens are public and not counted.",
    "exact_search is an upper bound on a search over the whole vocabulary: the true token is nearer to the sent "
    "state than every one of the inverter's top-k candidates. Where the true token's state equals the sent state "
    "(certified_exact) nothing else can be nearer and the bound is the search's result. exact_search_pruned is "
    "the attack restricted to those candidates. full_vocabulary_check runs the whole vocabulary on a few positions.",
    "The exact search runs each candidate after the true prefix (an attacker who recovered the prefix); a real "
    "one carries its own mistakes forward, so defended numbers are upper bounds in that sense too.",
    "Answer tokens reach the center twice: the returned state before each (logit_lens) and, fed back at the next "
    "step, as a sent state (exact_search, inverter). any_attack: recovered by at least one attack a center can "
    "run (pruned exact search, inverter, logit lens).",
    "The inverter is a ridge regression trained on public text only (Python's standard library, the shipped "
    "calibration text and task prompts, the held-out ones left out); for noise defences it is trained on "
    "states with the same noise. It never sees a private brick.",
    "Utility: perplexity and top-1 agreement with the undefended model on cfm_bench/data/eval_texts.json "
    "(4 texts, 128 tokens each), fp32.",
]


def plot(result: dict, path: Path) -> Path:
    """Recovery against edge layers (undefended) and against the perplexity cost of each defence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 3 + 0.32 * len(rows)), gridspec_kw={"width_ratios": [1, 1.3]})
    plain = sorted((r for r in rows if r["defence"]["name"] == "none"), key=lambda r: r["edge_layers"][0])
    ks = [r["edge_layers"][0] for r in plain]
    for part, key, style, label in (("prompt", "exact_search", "o-", "prompt, exact search"),
                                    ("prompt", "inverter", "s--", "prompt, learned inverter"),
                                    ("answer", "logit_lens", "^-", "answer, logit lens"),
                                    ("answer", "inverter", "v--", "answer, learned inverter")):
        ys = [r.get(part, {}).get(key) for r in plain]
        if all(y is not None for y in ys):
            left.plot(ks, [100 * y for y in ys], style, label=label)
    left.axhline(100 * TARGET["prompt"], color="grey", lw=0.8, ls=":")
    left.set(xlabel="edge layers before (and after) the center", ylabel="tokens recovered (%)", ylim=(0, 105),
             xscale="log", title="No defence: split k:(n-k)")
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_xticks([], minor=True)
    left.legend(fontsize=8)
    bars = (("prompt", "exact_search", "prompt: exact search"), ("prompt", "inverter", "prompt: learned inverter"),
            ("answer", "logit_lens", "answer: logit lens"), ("answer", "inverter", "answer: learned inverter"))
    y = np.arange(len(rows))
    for j, (part, key, label) in enumerate(bars):
        vals = [100 * (r.get(part, {}).get(key) or 0) for r in rows]
        right.barh(y + (j - 1.5) * 0.2, vals, height=0.2, label=label)
    right.set_yticks(y, [f"{r['name']} ({r['utility']['perplexity_change']:+.1%} ppl)" for r in rows], fontsize=7)
    right.invert_yaxis()
    right.axvline(100 * TARGET["prompt"], color="grey", lw=0.8, ls=":")
    right.set(xlabel="tokens recovered (%)", xlim=(0, 100), title="Every configuration (target: <= 10% at <= +3% perplexity)")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6 / len(rows) - 0.04), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(result: dict) -> str:
    """The rows as the markdown table of docs/privacy.md: recovery (%) of prompt and answer tokens by attack,
    and the perplexity cost."""

    def pct(x):
        return "" if x is None else f"{100 * x:.0f}"

    head = ("| configuration | prompt: exact search | prompt: inverter | answer: exact search | answer: inverter | "
            "answer: logit lens | perplexity | top-1 agreement |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        p, a, u = r["prompt"], r.get("answer", {}), r["utility"]
        lines.append(f"| {r['name']} | {pct(p['exact_search'])} | {pct(p['inverter'])} | {pct(a.get('exact_search'))} | "
                     f"{pct(a.get('inverter'))} | {pct(a.get('logit_lens'))} | {u['perplexity_change']:+.1%} | "
                     f"{pct(u['top1_agreement'])} |")
    return "\n".join(lines)
