"""The part-spec grammar with mechanisms (torch-free): which parts stay local, and *how*.

A spec is comma-separated terms; a term is a plain part-spec term (`attn`, `attn@9-11`, `blocks.11`, `head`,
`all`: `personalize.model.resolve`) optionally followed by `:MECHANISM` and `:KEY=VALUE` options:

    attn:lora,head              LoRA deltas on the attention linears local, the whole head local
    mlp@2-3:lora:r=8:alpha=16   rank 8, alpha 16 on blocks 2-3's MLP linears
    attn:lora-b                 LoRA's A federated, B local (FedSA-LoRA)
    attn:adapter:mid=64         FedPerfix's key/value adapter in every block, zero-initialised
    embed:prompt:tokens=8       eight local prompt tokens after the embedding (VPT-shallow)
    attn:finetune:steps=20      nothing local; 20 steps on attention per client before it is evaluated

A term without a mechanism is `full` (the part's own parameters local: the only kind before mechanisms).
Colons and `=` need no shell quoting and never clash with the commas between terms or a block range.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsens.personalize.errors import UserError

FULL = "full"
GRAMMAR = "write TERM[:MECHANISM[:KEY=VALUE]...], e.g. attn:lora,head or mlp:lora:r=8"


@dataclass(frozen=True)
class Term:
    """One term of a spec: a plain part-spec term, the mechanism that keeps it, and that mechanism's options."""

    part: str
    mechanism: str = FULL
    options: tuple[tuple[str, str], ...] = ()

    @property
    def text(self) -> str:
        if self.mechanism == FULL and not self.options:
            return self.part
        return ":".join([self.part, self.mechanism, *(f"{k}={v}" for k, v in self.options)])


def parse_term(text: str) -> Term:
    part, *rest = (piece.strip() for piece in text.split(":"))
    if not part:
        raise UserError(f"part spec term {text!r} names no part; {GRAMMAR}")
    if not rest:
        return Term(part)
    mechanism, *assignments = rest
    if not mechanism:
        raise UserError(f"part spec term {text!r}: empty mechanism after ':'; {GRAMMAR}")
    options: list[tuple[str, str]] = []
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"part spec term {text!r}: option {item!r} is not KEY=VALUE; {GRAMMAR}")
        if key.strip() in dict(options):
            raise UserError(f"part spec term {text!r} gives option {key.strip()} twice")
        options.append((key.strip(), value.strip()))
    return Term(part, mechanism, tuple(options))


def parse(spec: str) -> list[Term]:
    """The terms of a spec, in order (empty for an empty spec)."""
    return [parse_term(t) for t in (t.strip() for t in str(spec).split(",")) if t]


def is_plain(spec: str) -> bool:
    """Every term keeps its part whole (`full`, no options): what `personalize.model.resolve` reads as it is."""
    return all(term.mechanism == FULL and not term.options for term in parse(spec))


def mechanism_of(spec: str) -> str:
    """The mechanisms a spec uses beyond `full`, `+`-joined in order; `full` when it uses none (a sweep
    cell's `mechanism` column)."""
    used = [term.mechanism for term in parse(spec) if term.mechanism != FULL]
    return "+".join(dict.fromkeys(used)) or FULL


def parts_of(spec: str) -> str:
    """The spec's part terms without their mechanisms (`attn:lora,head` -> `attn,head`)."""
    return ",".join(term.part for term in parse(spec))
