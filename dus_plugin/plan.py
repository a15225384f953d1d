"""The DUS plan: n, m -> slices, layer map and parameter counts.

Pure arithmetic on the base's layer count n (``Architecture.n``): no torch, no mergekit, no I/O. The overlap is
called m everywhere in the code, as in the paper; users set it as ``drop`` (``--drop``, ``upscale.drop``).
SOLAR (Kim et al., 2023): take the n-layer base twice, drop the last m layers of one copy and
the first m of the other, stack them -> s = 2(n - m) layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from dus_plugin.errors import PlanError

LAYOUTS = ("solar", "interpose", "stack")
# Keys under which a config may hold its decoder settings (multimodal wrappers nest them).
_TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The part of a config that describes the decoder stack."""
    for key in _TEXT_CONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, Mapping) and "num_hidden_layers" in sub:
            return sub
    return config


@dataclass(frozen=True)
class Slice:
    """Half-open source layer range [start, end), as mergekit's ``layer_range``."""

    start: int
    end: int

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def as_list(self) -> list[int]:
        return [self.start, self.end]


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model: of each decoder layer, and outside the layers."""

    outside_layers: int
    layer_params: tuple[int, ...]
    """One count per layer, in order: MoE and dense layers of one model differ."""

    @property
    def layers(self) -> int:
        return len(self.layer_params)

    @property
    def per_layer(self) -> int | None:
        """The count of every layer when all layers are alike, else None."""
        return self.layer_params[0] if len(set(self.layer_params)) == 1 else None

    @property
    def total(self) -> int:
        return self.outside_layers + sum(self.layer_params)


@dataclass(frozen=True)
class DusPlan:
    """What an upscale does: which source layer each output layer copies."""

    n: int
    slices: tuple[Slice, ...]
    m: int | None = None
    """The overlap, for the solar and interpose layouts; None otherwise."""
    params_before: ParamCount | None = field(default=None, compare=False)
    layout: str = "layers"
    """solar, interpose, stack, or layers (an explicit layer list)."""
    repeat: int | None = None
    """g, for the stack layout: the whole base g times."""

    @property
    def s(self) -> int:
        return len(self.layer_map)

    @property
    def layer_map(self) -> list[int]:
        """layer_map[i] = the source layer that output layer i copies."""
        return [i for sl in self.slices for i in sl.layers]

    @property
    def seam(self) -> list[int]:
        """Output indices where a slice starts at a source layer that is not the previous + 1."""
        lm = self.layer_map
        return [i for i in range(1, len(lm)) if lm[i] != lm[i - 1] + 1]

    @property
    def duplicated_outputs(self) -> list[int]:
        """Output layers whose source layer already appeared earlier in the stack."""
        seen: set[int] = set()
        dups = []
        for i, src in enumerate(self.layer_map):
            if src in seen:
                dups.append(i)
            seen.add(src)
        return dups

    @property
    def params_after(self) -> ParamCount | None:
        if self.params_before is None:
            return None
        p = self.params_before
        return ParamCount(p.outside_layers, tuple(p.layer_params[i] for i in self.layer_map))

    def with_params(self, params: ParamCount | None) -> "DusPlan":
        """The same plan with the base's parameters counted elsewhere (on the model itself); unchanged for None."""
        return self if params is None else replace(self, params_before=params)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "layout": self.layout,
            "n": self.n,
            "m": self.m,
            "repeat": self.repeat,
            "s": self.s,
            "slices": [sl.as_list() for sl in self.slices],
            "layer_map": self.layer_map,
            "seam": self.seam,
            "duplicated_outputs": self.duplicated_outputs,
        }
        if self.params_before is not None:
            d["params_before"] = self.params_before.total
            d["params_after"] = self.params_after.total  # type: ignore[union-attr]
            d["params_per_layer"] = self.params_before.per_layer
        return d


def default_overlap(n: int) -> int:
    """The paper's choice, m = n/4 (8 for Mistral 7B's 32 layers), rounded down."""
    return n // 4


def _checked_m(n: int, m: int | None) -> int:
    """m with 1 <= m < n/2 (the default n/4 when None), the overlap both the solar and the interpose layout take."""
    m = default_overlap(n) if m is None else m
    if m <= 0:
        raise PlanError(f"`drop` must be at least 1 (got {m}); m = n/4 = {n // 4} is the paper's choice", setting="drop")
    if 2 * m >= n:
        raise PlanError(
            f"`drop` {m} gives s = 2({n}-{m}) = {2 * (n - m)} layers, no more than the base's {n}: "
            f"choose m < n/2 = {n / 2:g}", setting="drop")
    return m


def solar_plan(n: int, m: int | None = None) -> DusPlan:
    """Two slices [0, n-m) + [m, n) of the same base -> s = 2(n - m) layers."""
    m = _checked_m(n, m)
    return DusPlan(n=n, slices=(Slice(0, n - m), Slice(m, n)), m=m, layout="solar")


def interpose_plan(n: int, m: int | None = None) -> DusPlan:
    """The layers solar duplicates, [m, n-m), each copy placed right after its source: s = 2(n - m), no seam."""
    m = _checked_m(n, m)
    layers = [*range(m), *(i for i in range(m, n - m) for _ in (0, 1)), *range(n - m, n)]
    return replace(layer_list_plan(n, layers), m=m, layout="interpose")


def stack_plan(n: int, repeat: int | None = None) -> DusPlan:
    """The whole base ``repeat`` times (G_stack): s = g n."""
    g = 2 if repeat is None else repeat
    if g < 2:
        raise PlanError(f"`repeat` must be at least 2 (got {g}): the stack layout repeats the whole base g times",
                        setting="repeat")
    return replace(layer_list_plan(n, list(range(n)) * g), layout="stack", repeat=g)


def layout_plan(n: int, layout: str, m: int | None = None, repeat: int | None = None) -> DusPlan:
    """The plan of a named layout; ``m`` serves solar and interpose, ``repeat`` stack."""
    if layout == "stack":
        if m is not None:
            raise PlanError("`drop` does not apply to the stack layout, which repeats all layers; give `repeat`",
                            setting="drop")
        return stack_plan(n, repeat)
    if repeat is not None:
        raise PlanError(f"`repeat` applies to the stack layout only, not {layout}", setting="repeat")
    if layout == "interpose":
        return interpose_plan(n, m)
    if layout == "solar":
        return solar_plan(n, m)
    raise PlanError(f"`layout` {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}", setting="layout")


def recognise(n: int, layer_map: Sequence[int]) -> DusPlan:
    """The plan a hand-written layer map is: a named layout when it is one, else an explicit layer list.

    Each layout fixes its parameter by the output size (s = 2(n - m), s = g n), so one candidate each is tried."""
    layer_map, s = list(layer_map), len(layer_map)
    candidates = []
    if s % 2 == 0 and 1 <= n - s // 2 < (n + 1) // 2:
        candidates += [solar_plan(n, n - s // 2), interpose_plan(n, n - s // 2)]
    if s % n == 0 and s >= 2 * n:
        candidates.append(stack_plan(n, s // n))
    return next((p for p in candidates if p.layer_map == layer_map), None) or layer_list_plan(n, layer_map)


def parse_layers(spec: str) -> list[int]:
    """Parse ``"0:24,8:32"`` (half-open ranges) or ``"0,1,2,2,3"`` (single indices) or a mix."""
    layers: list[int] = []
    for raw in spec.split(","):
        item = raw.strip()
        try:
            if ":" in item:
                a, b = (int(x) for x in item.split(":"))
                if b <= a:
                    raise PlanError(f"`layers` range {item!r} is empty or reversed; write start:end with start < end",
                                    setting="layers")
                layers.extend(range(a, b))
            else:
                layers.append(int(item))
        except ValueError as e:
            if isinstance(e, PlanError):
                raise
            raise PlanError(f"`layers` item {item!r} is not an index or a start:end range; example: 0:24,8:32",
                            setting="layers") from None
    return layers


def layer_list_plan(n: int, layers: Sequence[int]) -> DusPlan:
    """Any stacking: output layer i copies source layer ``layers[i]``; runs become slices."""
    if not layers:
        raise PlanError("`layers` is empty; give the source layer of every output layer, e.g. 0:24,8:32", setting="layers")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise PlanError(f"`layers` names layer {bad[0]}, outside the base's 0..{n - 1}", setting="layers")
    slices: list[Slice] = []
    start = prev = layers[0]
    for i in list(layers[1:]) + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        slices.append(Slice(start, prev + 1))
        if i is not None:
            start = prev = i
    return DusPlan(n=n, slices=tuple(slices))


def count_params(config: Mapping[str, Any]) -> ParamCount | None:
    """Parameter count of a Llama-like decoder from its config alone; None when a size is missing.

    Covers Llama, Mistral, Qwen2/3 (qkv bias, q/k norms), Gemma 2/3 (four norms per layer), Phi-3 (fused, same
    count): a first figure before transformers is asked. ``dus plan`` replaces it with the count of the model
    built on the meta device (``Architecture.param_count``), which holds for every family.
    """
    c = text_config(config)
    try:
        d, f, h = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_attention_heads"])
        v, n = int(c["vocab_size"]), int(c["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(c.get("num_key_value_heads") or h)
    hd = int(c.get("head_dim") or d // h)
    model_type = str(c.get("model_type", ""))
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if model_type.startswith("qwen2"):
        attn += (h + 2 * kv) * hd  # Qwen2 always has q/k/v biases
    elif c.get("attention_bias"):
        attn += (h + 2 * kv) * hd + d
    if model_type.startswith(("qwen3", "gemma3")):
        attn += 2 * hd  # q_norm, k_norm
    mlp = 3 * d * f + (2 * f + d if c.get("mlp_bias") else 0)
    norms = 4 * d if model_type.startswith("gemma2") or model_type.startswith("gemma3") else 2 * d
    embed = v * d
    tied = c.get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    head = 0 if tied else v * d
    return ParamCount(outside_layers=embed + head + d, layer_params=(attn + mlp + norms,) * n)


def format_layer_map(plan: DusPlan) -> str:
    """A compact human table: output ranges -> source ranges, with the seam marked."""
    lines = [f"layout {plan.layout}: n={plan.n}  " + (f"g={plan.repeat}" if plan.repeat else
             f"m={plan.m if plan.m is not None else '-'}") + f"  s={plan.s}"]
    out = 0
    seen: set[int] = set()
    for k, sl in enumerate(plan.slices):
        length = sl.end - sl.start
        copies = [(out + i, src) for i, src in enumerate(sl.layers) if src in seen]
        mark = "  <- seam" if plan.layout == "solar" and k > 0 and copies else ""
        lines.append(f"  out {out:>3}..{out + length - 1:<3} <- base {sl.start:>3}..{sl.end - 1:<3}{mark}"
                     + (f"  copies: {_runs(copies)}" if copies else ""))
        seen.update(sl.layers)
        out += length
    if plan.params_before is not None:
        before, after = plan.params_before.total, plan.params_after.total  # type: ignore[union-attr]
        lines.append(f"  params {human_count(before)} -> {human_count(after)} (x{after / before:.2f})")
    return "\n".join(lines)


def _runs(pairs: list[tuple[int, int]]) -> str:
    """'out 23..38 = base 7..22' for (output, source) pairs, one range per run that steps by one on both sides."""
    runs: list[list[tuple[int, int]]] = []
    for o, b in pairs:
        if runs and runs[-1][-1] == (o - 1, b - 1):
            runs[-1].append((o, b))
        else:
            runs.append([(o, b)])
    return ", ".join(f"out {r[0][0]} = base {r[0][1]}" if len(r) == 1 else
                     f"out {r[0][0]}..{r[-1][0]} = base {r[0][1]}..{r[-1][1]}" for r in runs)


def human_count(x: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)
