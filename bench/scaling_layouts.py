"""scaling.py's layout syntax (U<n>, R<n>, SP<n>, CFG2, DP<n>, CH<n>; scaling.py's docstring) and the
points a sweep runs: every (world, layout, backend, measure, weight sharding), deduplicated, with a
note for each layout that cannot run."""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import re

from paradit.plan.layout import ParallelConfig, auto_sp
from paradit.plan.sharding import refusal

AXES = ("ulysses", "ring", "cfg", "chords", "dp")
TERM = re.compile(r"(SP|CFG|CH|DP|U|R)(\d*)")


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    text: str
    terms: tuple[tuple[str, int | None], ...]   # (term, degree or None for "the rest")

    @property
    def family(self) -> str:
        """Curve name: the layout with the free degree shown as n, fixed ones kept."""
        return "x".join(f"{t}{'<n>' if d is None else d}" for t, d in self.terms) or "1"


def parse_layout(text: str) -> LayoutSpec:
    s = text.strip().upper().replace("*", "X")
    if s in ("1", "SINGLE"):
        return LayoutSpec(text, ())
    s = s.replace("X", "")
    if not TERM.sub("", s) == "" or not s:
        raise ValueError(f"layout {text!r}: use terms U<n>, R<n>, SP<n>, CFG2, DP<n>, CH<n> joined by 'x' "
                         f"(e.g. U2xCFG2); one term may omit its number to take the rest of the world")
    terms = tuple((t, int(n) if n else None) for t, n in TERM.findall(s))
    terms = tuple((t, 2 if t == "CFG" and n is None else n) for t, n in terms)  # "CFG" means CFG2
    if sum(n is None for _, n in terms) > 1:
        raise ValueError(f"layout {text!r}: at most one term may leave out its degree")
    if len({t for t, _ in terms}) < len(terms) or {"SP", "U"} <= {t for t, _ in terms} or \
            {"SP", "R"} <= {t for t, _ in terms}:
        raise ValueError(f"layout {text!r}: each axis once (SP<n> already sets U and R)")
    return LayoutSpec(text, terms)


def resolve(spec: LayoutSpec, world: int, heads: int) -> ParallelConfig:
    """The ParallelConfig of a spec in a world; ValueError if it does not fit."""
    fixed = math.prod(n for _, n in spec.terms if n is not None)
    free = [t for t, n in spec.terms if n is None]
    if world % fixed or (not free and fixed != world):
        raise ValueError(f"{spec.text}: degrees multiply to {fixed}, not {world}")
    degrees = {t: (world // fixed if n is None else n) for t, n in spec.terms}
    deg = dict(ulysses=degrees.get("U", 1), ring=degrees.get("R", 1), cfg=degrees.get("CFG", 1),
               chords=degrees.get("CH", 1), dp=degrees.get("DP", 1))
    if "SP" in degrees:
        deg["ulysses"], deg["ring"] = auto_sp(heads, degrees["SP"])
    pc = ParallelConfig(**deg)
    pc.validate(world, heads)
    return pc


def config_dict(pc: ParallelConfig) -> dict:
    return {a: getattr(pc, a) for a in AXES} | ({"shard_weights": pc.shard_weights} if pc.shard_weights != "none"
                                                else {})


def plan_points(specs: list[LayoutSpec], worlds: list[int], heads: int, backends: list[str],
                measures: list[str], max_world: int, shards=("none",)) -> tuple[list[dict], list[str]]:
    """Every (world, layout, backend, measure) to run, deduplicated; and notes on what was skipped."""
    points, seen, notes, ran = [], {}, [], set()
    chords_ok, why = _chords_runtime()
    for world in sorted(set(worlds) | {1}):
        if world > max_world:
            notes.append(f"world {world}: skipped, this machine has {max_world} devices")
            continue
        for spec in [LayoutSpec("1", ())] + specs:
            try:
                pc = resolve(spec, world, heads)
            except ValueError as err:
                if "multiply to" not in str(err):      # it would fit this world, but cannot run
                    notes.append(f"world {world}: {spec.text} skipped: {err}")
                continue
            if pc.chords > 1 and not chords_ok:
                notes.append(f"world {world}: {spec.text} skipped: CHORDS runtime not importable ({why}); "
                             f"bench/chords.py measures the algorithm in one process")
                continue
            ran.add(spec.text)
            for backend, measure, shard in itertools.product(backends, measures, shards):
                if measure == "forward" and (pc.cfg > 1 or pc.chords > 1):
                    continue
                pcs = dataclasses.replace(pc, shard_weights=shard)
                if shard != "none" and (refusal(pcs) or split_backend(backend)[1]):   # a group of one; compiled
                    continue
                key = (world, tuple(config_dict(pcs).values()), backend, measure)
                family = spec.family + (f" shard:{shard}" if shard != "none" else "")
                if key in seen:
                    seen[key]["families"].append(family)
                    continue
                seen[key] = dict(world=world, layout=spec.text, families=[family], config=config_dict(pcs),
                                 label=pcs.describe(), backend=backend, measure=measure)
                points.append(seen[key])
    notes += [f"{s.text}: fits none of the worlds {sorted(set(worlds))}" for s in specs
              if s.text not in ran and not any(s.text in n for n in notes)]
    return points, notes


def _chords_runtime() -> tuple[bool, str]:
    try:
        importlib.import_module("paradit.engine.chords")
        return True, ""
    except ImportError as err:
        return False, str(err)


def split_backend(backend: str) -> tuple[str, bool]:
    """'sdpa+compile' -> ('sdpa', True): the attention backend, and whether the blocks are compiled."""
    name, _, mode = backend.partition("+")
    return name, mode == "compile"
