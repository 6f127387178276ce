"""The purification methods: "none" (the naive baseline) and the paper's five, one module each."""

from __future__ import annotations

from .aggregation import Aggregation
from .averaging import Averaging
from .base import Decision, Purifier, RouterSettings, top_choice, uniform_weights
from .classifier_router import ClassifierRouter
from .plackett_luce import PlackettLuceRanking
from .rl_selection import RLTeacherSelection
from .similarity_router import SimilarityRouter

PURIFIERS: dict[str, type[Purifier]] = {
    cls.name: cls
    for cls in (Averaging, Aggregation, PlackettLuceRanking, ClassifierRouter, SimilarityRouter, RLTeacherSelection)
}
PURIFICATIONS = tuple(PURIFIERS)


def build_purifier(name: str, num_teachers: int, feature_dim: int, settings: RouterSettings) -> Purifier:
    if name not in PURIFIERS:
        raise ValueError(f"Unknown purification {name!r}; choose one of {list(PURIFIERS)}.")
    return PURIFIERS[name](num_teachers, feature_dim, settings)


__all__ = [
    "PURIFICATIONS",
    "PURIFIERS",
    "Aggregation",
    "Averaging",
    "ClassifierRouter",
    "Decision",
    "PlackettLuceRanking",
    "Purifier",
    "RLTeacherSelection",
    "RouterSettings",
    "SimilarityRouter",
    "build_purifier",
    "top_choice",
    "uniform_weights",
]
