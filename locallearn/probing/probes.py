"""Probes: classifiers that read a label off frozen features (Alain & Bengio 2016).

A probe is fitted on probe-train for each candidate regularization strength, the strength with the
best probe-dev accuracy is kept, and its probe-test accuracy reported. The control task is probed
with the strength selected for the real task, so that selectivity compares like with like.
Features are standardized with probe-train statistics first. Everything is seeded.
"""

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler


@dataclass
class LinearProbe:
    """Multinomial logistic regression with an L2 penalty; ``C`` (inverse strength) picked on probe-dev."""

    C: tuple[float, ...] = (0.01, 0.1, 1.0)
    max_iter: int = 1000

    def candidates(self):
        return list(self.C)

    def make(self, strength, seed: int):
        return LogisticRegression(C=strength, max_iter=self.max_iter, random_state=seed)


@dataclass
class MLPProbe:
    """One hidden ReLU layer; ``alpha`` (L2 strength) picked on probe-dev."""

    hidden: int = 256
    alpha: tuple[float, ...] = (1e-4, 1e-2)
    max_iter: int = 100

    def candidates(self):
        return list(self.alpha)

    def make(self, strength, seed: int):
        return MLPClassifier((self.hidden,), alpha=strength, max_iter=self.max_iter, early_stopping=True,
                             random_state=seed)


@dataclass
class ProbeResult:
    accuracy: float  # probe-test accuracy on the task
    dev_accuracy: float
    strength: float  # the selected regularization value
    control_accuracy: float | None = None  # probe-test accuracy on the control task
    converged: bool = True  # False if any fit stopped at max_iter (reported, not hidden)

    @property
    def selectivity(self) -> float | None:
        return None if self.control_accuracy is None else self.accuracy - self.control_accuracy


def run_probe(probe, feats: dict[str, np.ndarray], labels: dict[str, np.ndarray],
              control: dict[str, np.ndarray] | None = None, seed: int = 0) -> ProbeResult:
    """``feats`` and ``labels`` (and ``control``) hold "train", "dev", "test" arrays: (N, C) and (N,)."""
    scaler = StandardScaler().fit(feats["train"])
    x = {s: scaler.transform(f) for s, f in feats.items()}
    best = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for strength in probe.candidates():
            clf = probe.make(strength, seed).fit(x["train"], labels["train"])
            dev = clf.score(x["dev"], labels["dev"])
            if best is None or dev > best[0]:
                best = (dev, strength, clf)
        dev, strength, clf = best
        result = ProbeResult(float(clf.score(x["test"], labels["test"])), float(dev), strength)
        if control is not None:
            ctrl = probe.make(strength, seed).fit(x["train"], control["train"])
            result.control_accuracy = float(ctrl.score(x["test"], control["test"]))
    result.converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return result
