"""Which bricks an answer runs with: the run's own (fixed, or routed per prompt) plus any a request asks for.

A `BrickSet` belongs to one generator (`cfm_runtime.runtime.Model.new_generator`). The model's bricks
when the set is made, plus the run's fixed bricks, are its baseline; per prompt it adds the routed brick
(`bricks="auto"`) or the bricks a caller asks for (`cfm serve`'s model ids `base+NAME`), and takes them
off again for the next prompt that does not ask. Layers that run on a center are never given a brick.
"""

from __future__ import annotations

from typing import Callable

from ..errors import CfmError
from .apply import apply_brick, check_base, remove_brick
from .formats import validate
from .routing import DEFAULT_THRESHOLD, route
from .store import Brick, BrickStore


class BrickSet:
    def __init__(self, model, store: BrickStore, fixed=(), auto: bool = False, threshold: float | None = None,
                 log: Callable[[str], None] | None = None):
        self.model, self.store, self.auto = model, store, auto
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.log = log or (lambda message: None)
        self.loaded: dict[str, Brick] = {}
        self.extra: tuple[tuple[str, float], ...] = ()  # bricks added on top of the baseline for this answer
        self.center_layers: frozenset[int] = frozenset()  # layers that run on a center: no brick may touch them
        self.routed: str | None = None
        self.fixed = tuple(fixed)
        for name, weight in fixed:
            apply_brick(model, self.brick(name), weight)
        if fixed:
            self.log(f"[bricks: {', '.join(f'{n}:{w:g}' for n, w in fixed)}]")
        self.metas = [m for m in store.list() if m.get("signature")] if auto else []
        if auto and not self.metas:
            self.log(f"[bricks: auto, but no brick in {store.root} has a routing signature]")

    def brick(self, name: str) -> Brick:
        """A brick from the store, checked against this model and placement (loaded once)."""
        if name not in self.loaded:
            brick = self.store.load(name)
            check_base(self.model, brick)
            validate(brick.pairs, self.model.config, f"brick {brick.name!r}")
            self.loaded[name] = brick
        brick = self.loaded[name]
        on_center = sorted(set(brick.layers) & self.center_layers)
        if on_center:
            raise CfmError(f"brick {name!r} changes layers {on_center}, which run on the center; bricks never "
                           "leave this device: choose a split whose center layers avoid them")
        return brick

    def layers(self) -> set[int]:
        """Layers the run's bricks touch: those on the model, and with auto routing every routable brick's."""
        mine = self.model.brick_layers()
        return mine | {layer for m in self.metas for layer in m.get("layers", [])}

    def offered(self) -> list[str]:
        """Names of the stored bricks this run can put on (made for this model, clear of the center's layers)."""
        out = []
        for name in self.store.names():
            try:
                self.brick(name)
            except CfmError as e:
                self.log(f"[brick {name} not offered: {e}]")
                continue
            out.append(name)
        return out

    def select(self, prompt_ids: list[int], requested: list[tuple[str, float]] | None) -> bool:
        if requested is not None:
            want = tuple((n, float(w)) for n, w in requested)
        elif self.auto:
            name, scores = route(self.model, prompt_ids, self.metas, self.threshold)
            best = ", ".join(f"{n} {s:.2f}" for n, s in sorted(scores.items(), key=lambda kv: -kv[1])[:3])
            self.log(f"[bricks: auto -> {name or 'none'} (scores: {best or '-'}; threshold {self.threshold:g})]")
            self.routed = name
            want = ((name, 1.0),) if name else ()
        else:
            want = ()
        if want == self.extra:
            return False
        bricks = [(self.brick(n), w) for n, w in want]  # every one checked before the model changes
        for name, _ in self.extra:
            remove_brick(self.model, name)
        self.extra = ()
        for brick, weight in bricks:
            apply_brick(self.model, brick, weight)
        self.extra = want
        return True

    def report(self) -> dict:
        return {"brick": self.routed} if self.auto else {}

    def close(self) -> None:
        """Take off every brick this set put on (the model is left as the set found it)."""
        for name, _ in self.extra + self.fixed:
            remove_brick(self.model, name)
        self.extra = self.fixed = ()
