"""Probes: classifiers that read a label off frozen features (Alain & Bengio 2016).

A probe is fitted on probe-train for each candidate regularization strength, the strength with the
best probe-dev accuracy is kept, and its probe-test accuracy reported. The control task is probed
with the strength selected for the real task, so that selectivity compares like with like.
Features are standardized with probe-train statistics first. Everything is seeded.

The linear probe is scikit-learn's ``LogisticRegression(C)`` (multinomial, L2 on the weights, not on the
bias; lbfgs, gradient tolerance ``tol``) fitted in torch: every layer of a model at once, one full-batch
L-BFGS over the sum of their objectives (which leaves each layer's minimum where it was), the strengths
from the strongest to the weakest, each starting from the previous one's solution (a warm start: the same
convex problem's minimum, reached in fewer steps). It reaches scikit-learn's accuracies
(tests/test_probing.py compares them; ``python analysis/probe_bench.py`` times both on real runs). The MLP
probe stays scikit-learn's ``MLPClassifier``, one layer and strength at a time.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler


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


@dataclass
class LinearProbe:
    """Multinomial logistic regression with an L2 penalty; ``C`` (inverse strength) picked on probe-dev.
    Minimizes, per layer and ``C``, mean cross-entropy + |W|^2 / (2 C N) over N probe-train words."""

    C: tuple[float, ...] = (0.01, 0.1, 1.0)
    max_iter: int = 1000
    tol: float = 1e-4  # stop when no gradient entry exceeds it (scikit-learn's lbfgs criterion)

    def fit_layers(self, feats: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                   control: dict[str, np.ndarray] | None = None, seed: int = 0) -> dict[str, ProbeResult]:
        """``feats[split][layer]`` (N, C) and ``labels[split]`` (N,) (and ``control``) for "train", "dev", "test"
        -> a :class:`ProbeResult` per layer. Deterministic: full-batch L-BFGS from zero weights."""
        layers = list(feats["train"])
        x = {s: torch.from_numpy(np.stack([feats[s][name] for name in layers])).float() for s in feats}  # (L, N, C)
        mean, std = x["train"].mean(1, keepdim=True), x["train"].std(1, unbiased=False, keepdim=True)
        x = {s: (v - mean) / torch.where(std > 0, std, torch.ones_like(std)) for s, v in x.items()}
        y, K = _labels(labels)
        L = len(layers)
        dev, test, done, fit = torch.zeros(L, len(self.C)), torch.zeros(L, len(self.C)), True, None
        for s in sorted(range(len(self.C)), key=lambda s: self.C[s]):  # strongest first, each warm-starting the next
            fit = _fit(x["train"], y["train"], torch.full((L, 1), float(self.C[s])), K, self.max_iter, self.tol, fit)
            dev[:, s] = _accuracy(x["dev"], y["dev"], *fit[:2])[:, 0]
            test[:, s] = _accuracy(x["test"], y["test"], *fit[:2])[:, 0]
            done = done and fit[2]
        best = [int(s) for s in dev.argmax(1)]  # the first of equals: the strongest regularization among the best
        results = {name: ProbeResult(float(test[i, best[i]]), float(dev[i, best[i]]), float(self.C[best[i]]),
                                     converged=done) for i, name in enumerate(layers)}
        if control is not None:
            yc, Kc = _labels(control)
            chosen = torch.tensor([[float(self.C[s])] for s in best])  # (L, 1): each layer's selected C
            Wc, bc, done_c = _fit(x["train"], yc["train"], chosen, max(K, Kc), self.max_iter, self.tol)
            ctrl = _accuracy(x["test"], yc["test"], Wc, bc)[:, 0]
            for i, name in enumerate(layers):
                results[name].control_accuracy = float(ctrl[i])
                results[name].converged = done and done_c
        return results


def _labels(labels: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], int]:
    """Per split, the labels as a tensor; and the number of classes they span."""
    y = {s: torch.from_numpy(np.asarray(v)).long() for s, v in labels.items()}
    return y, int(max(int(v.max()) for v in y.values())) + 1


def _fit(x: torch.Tensor, y: torch.Tensor, C: torch.Tensor, K: int, max_iter: int, tol: float, init=None):
    """x (L, N, D), y (N,), C (L, S) -> weights (L, S, D, K), biases (L, S, K), whether every problem met ``tol``.
    One L-BFGS over the sum of the L x S independent objectives (their gradients do not mix), from zero or from
    ``init``, a previous result of the same shapes."""
    L, N, D = x.shape
    S = C.shape[1]
    if init is None:
        W, b = torch.zeros(L, D, S * K), torch.zeros(L, 1, S * K)
    else:
        W, b = init[0].permute(0, 2, 1, 3).reshape(L, D, S * K).clone(), init[1].reshape(L, 1, S * K).clone()
    W.requires_grad_(), b.requires_grad_()
    penalty = (1.0 / (2 * C * N)).reshape(L, 1, S, 1)
    targets = y.reshape(1, N, 1).expand(L, N, S).reshape(-1)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        logits = torch.baddbmm(b, x, W)  # (L, N, S*K)
        loss = F.cross_entropy(logits.reshape(-1, K), targets, reduction="sum") / N
        loss = loss + (penalty * W.reshape(L, D, S, K).square()).sum()
        loss.backward()
        return loss

    opt.step(objective)
    objective()
    converged = bool(max(W.grad.abs().max(), b.grad.abs().max()) <= tol)
    W, b = W.detach().reshape(L, D, S, K).permute(0, 2, 1, 3), b.detach().reshape(L, S, K)
    return W, b, converged


@torch.no_grad()
def _accuracy(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (L, N, D), y (N,), W (L, S, D, K), b (L, S, K) -> accuracy (L, S)."""
    logits = torch.einsum("lnd,lsdk->lsnk", x, W) + b.unsqueeze(2)  # (L, S, N, K)
    return (logits.argmax(-1) == y).float().mean(-1)


class ScikitLearnProbe:
    """A scikit-learn classifier per layer and strength (``make(strength, seed)``, strengths ``candidates()``)."""

    def fit_layers(self, feats, labels, control=None, seed: int = 0) -> dict[str, ProbeResult]:
        return {name: self._fit_one({s: f[name] for s, f in feats.items()}, labels, control, seed)
                for name in feats["train"]}

    def _fit_one(self, feats, labels, control, seed) -> ProbeResult:
        scaler = StandardScaler().fit(feats["train"])
        x = {s: scaler.transform(f) for s, f in feats.items()}
        best = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            for strength in self.candidates():
                clf = self.make(strength, seed).fit(x["train"], labels["train"])
                dev = clf.score(x["dev"], labels["dev"])
                if best is None or dev > best[0]:
                    best = (dev, strength, clf)
            dev, strength, clf = best
            result = ProbeResult(float(clf.score(x["test"], labels["test"])), float(dev), strength)
            if control is not None:
                ctrl = self.make(strength, seed).fit(x["train"], control["train"])
                result.control_accuracy = float(ctrl.score(x["test"], control["test"]))
        result.converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return result


@dataclass
class MLPProbe(ScikitLearnProbe):
    """One hidden ReLU layer; ``alpha`` (L2 strength) picked on probe-dev (scikit-learn, a layer at a time)."""

    hidden: int = 256
    alpha: tuple[float, ...] = (1e-4, 1e-2)
    max_iter: int = 100

    def candidates(self):
        return list(self.alpha)

    def make(self, strength, seed: int):
        return MLPClassifier((self.hidden,), alpha=strength, max_iter=self.max_iter, early_stopping=True,
                             random_state=seed)


@dataclass
class ScikitLearnLinearProbe(ScikitLearnProbe):
    """:class:`LinearProbe`'s model fitted by scikit-learn's ``LogisticRegression``, a layer and a ``C`` at a time:
    the reference the torch probe is checked against (``probe=linear_sklearn``; slower)."""

    C: tuple[float, ...] = (0.01, 0.1, 1.0)
    max_iter: int = 1000
    tol: float = 1e-4

    def candidates(self):
        return list(self.C)

    def make(self, strength, seed: int):
        return LogisticRegression(C=strength, max_iter=self.max_iter, tol=self.tol, random_state=seed)


def run_probe(probe, feats: dict[str, np.ndarray], labels: dict[str, np.ndarray],
              control: dict[str, np.ndarray] | None = None, seed: int = 0) -> ProbeResult:
    """One layer's probe: ``feats`` and ``labels`` (and ``control``) hold "train", "dev", "test" arrays."""
    return probe.fit_layers({s: {"x": f} for s, f in feats.items()}, labels, control, seed)["x"]
