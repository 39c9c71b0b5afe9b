"""The mixed-precision search: one option per group (float or a precision), the whole front of size
against quality lost, and the mix each budget picks from it. Pure numbers: no torch, no model.

Quality lost is each group's measured change on the calibration split (quantized alone, against
float), summed over the groups quantized: the additive model every layer-wise search makes, which
is why each chosen mix is then trained or calibrated and tested as a whole model. The front is
exact (a dynamic programme over the groups that keeps, after each group, every partial mix no other
beats in both size and loss; a mix dominated there stays dominated, since later groups add the same
to both) while it holds at most `exact_front_limit` mixes, and greedy past that (from the smallest
mix, the upgrade that buys back the most loss per byte, one at a time), which the result says.
"""

from __future__ import annotations

from dataclasses import dataclass

EXACT = "exact"
GREEDY = "greedy"


@dataclass(frozen=True)
class Option:
    """One way to store a group: its choice (`float` or a precision's name), its bytes, and the
    quality it loses (in the budget's unit; never below zero: a change in the calibration split's
    favour is noise the search must not spend)."""

    choice: str
    bytes: int
    harm: float


@dataclass(frozen=True)
class Mix:
    """One option per group, in the groups' order, with their summed bytes and harm."""

    choices: tuple[str, ...]
    bytes: int
    harm: float


@dataclass(frozen=True)
class Front:
    mixes: list[Mix]  # by bytes, ascending (and so by harm, descending)
    method: str  # EXACT or GREEDY


def search_front(options: list[list[Option]], limit: int) -> Front:
    """The mixes of one option per group that no other mix beats in both bytes and harm."""
    mixes = [Mix((), 0, 0.0)]
    for group in options:
        mixes = _pareto(
            Mix((*mix.choices, option.choice), mix.bytes + option.bytes, mix.harm + option.harm)
            for mix in mixes
            for option in group
        )
        if len(mixes) > limit:
            return Front(_pareto(_greedy(options)), GREEDY)
    return Front(mixes, EXACT)


def _pareto(mixes: object) -> list[Mix]:
    """The non-dominated mixes, by bytes ascending: each keeps fewer bytes than every mix of less harm."""
    kept: list[Mix] = []
    for mix in sorted(mixes, key=lambda m: (m.bytes, m.harm)):  # type: ignore[attr-defined]
        if not kept or mix.harm < kept[-1].harm:
            kept.append(mix)
    return kept


def _greedy(options: list[list[Option]]) -> list[Mix]:
    """From each group's smallest option, the upgrade that removes the most harm per added byte, one
    at a time, until none removes any: every mix on that path."""
    current = [min(group, key=lambda o: (o.bytes, o.harm)) for group in options]
    path = [_mix(current)]
    while True:
        upgrades = [
            ((now.harm - better.harm) / max(better.bytes - now.bytes, 1), index, better)
            for index, (group, now) in enumerate(zip(options, current, strict=True))
            for better in group
            if better.harm < now.harm
        ]
        if not upgrades:
            return path
        _, index, better = max(upgrades, key=lambda u: u[0])
        current[index] = better
        path.append(_mix(current))


def _mix(options: list[Option]) -> Mix:
    return Mix(tuple(o.choice for o in options), sum(o.bytes for o in options), sum(o.harm for o in options))


def smallest_within(front: Front, max_harm: float) -> Mix | None:
    """The mix of fewest bytes that loses at most `max_harm` (None when none does)."""
    return next((mix for mix in front.mixes if mix.harm <= max_harm), None)


def best_within(front: Front, max_bytes: int) -> Mix | None:
    """The mix of least harm within `max_bytes` (None when even the smallest is larger)."""
    fitting = [mix for mix in front.mixes if mix.bytes <= max_bytes]
    return fitting[-1] if fitting else None
