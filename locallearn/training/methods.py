"""Methods that send downstream information back across the gradient cut, in every execution mode.

Under local learning chunk k is never told what chunk k+1 needs. A method adds to chunk k's backward pass a term
built from the *message*: the gradient chunk k+1's objective sends to its detached input, ``∂J_{k+1}/∂h_k``
(``J_{k+1}`` = its weighted local loss plus its own method term). Chunk k's parameters still get no gradient
through chunk k+1's graph.

* :class:`SyntheticGradients` (Jaderberg et al. 2017, "Decoupled Neural Interfaces"; Czarnecki et al. 2017): a
  predictor at chunk k's output guesses the message from h_k; chunk k backpropagates ``weight * <ĝ, h_k>`` with its
  loss, and the predictor is regressed onto the true message. As the message includes chunk k+1's own synthetic term,
  the last loss's signal reaches every chunk (DNI's bootstrapping).
* :class:`DelayedGradients` (Huo et al. 2018, "Decoupled Parallel Backpropagation"; Huo et al. 2018, "Training
  Neural Networks Using Features Replay"): chunk k applies the true message to the activations it came from,
  ``weight * <δ_k, h_k>``, recomputed from the saved input under the same dropout masks with the current weights
  (features replay; keeping the old graph instead is impossible in PyTorch once the optimizer has changed the
  weights in place). The message is ∂(chunk k+1's local loss)/∂h_k only: it does not relay what chunk k+1 itself
  received, so the signal reaches one chunk down, as 2-wise interlocking (``interlock=2``) does, one step late.
* n-wise interlocking is a chunk plan (``interlock``): its gradient goes through the graph, not through messages.

Messages are one step behind in every mode: chunk k's step t uses the message of step t-1. In one process that is a
choice (the message of step t is known before the optimizer steps); it is what ``mode=pipeline`` can have without
chunk k waiting for chunk k+1, and with it every mode makes the same updates. A method's per-chunk state (what the
next step needs: the last output or input, the message) is checkpointed, so a resumed run continues exactly.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from locallearn.model.chunked import ChunkedGPT, dropout_state, replaying


class Method:
    """Local learning: chunks send nothing back. The base of every method.

    Per training step and chunk k, a strategy calls ``start(net, k, x)`` before chunk k's forward (``x`` its input),
    adds ``with_loss(net, k, h)`` to the chunk's weighted loss (same graph), backpropagates each of
    ``apart(net, k)`` (graphs of their own), and after chunk k's backward hands the gradient of its input to
    ``receive(k - 1, grad)``.
    """

    name = "local"
    sends = False  # whether chunks send their input's gradient back (their cut input is then a leaf)
    uses_output = False  # whether with_loss reads the chunk's output h (its loss is then scored whole)

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)
        self.chunks: dict[int, dict] = {}  # per chunk: what its next step needs
        self.metrics: dict[str, torch.Tensor] = {}  # logged with the chunk's update

    def start(self, net: ChunkedGPT, k: int, x) -> None:
        """Before chunk k's training forward on input ``x`` (token ids for k = 0, else the hand-off)."""

    def with_loss(self, net: ChunkedGPT, k: int, h: torch.Tensor) -> torch.Tensor | None:
        """A term added to chunk k's weighted local loss (its graph is the loss's), or None."""
        return None

    def apart(self, net: ChunkedGPT, k: int) -> Iterator[torch.Tensor]:
        """Terms of chunk k's objective on graphs of their own (backpropagated one at a time in sequential mode)."""
        return iter(())

    def receive(self, k: int, grad: torch.Tensor | None) -> None:
        """The message for chunk k's output: the gradient chunk k+1's objective sent to its input this step."""
        if grad is not None:
            self.chunks.setdefault(k, {})["grad"] = grad.detach()

    def metric_names(self, k: int, K: int) -> list[str]:
        """The metrics chunk k of K logs (names as in TensorBoard)."""
        return []

    def take_metrics(self) -> dict[str, torch.Tensor]:
        metrics, self.metrics = self.metrics, {}
        return metrics

    def state_bytes(self) -> int:
        """Bytes the method holds between steps (outputs, inputs, messages; random states aside)."""
        def size(v):
            if isinstance(v, dict):
                return sum(size(x) for x in v.values())
            return v.numel() * v.element_size() if torch.is_tensor(v) else 0
        return sum(size({n: v for n, v in state.items() if n != "rng"}) for state in self.chunks.values())

    def state(self, k: int) -> dict:
        return dict(self.chunks.get(k, {}))

    def load_state(self, k: int, state: dict) -> None:
        self.chunks[k] = dict(state)

    def state_dict(self) -> dict:
        return {k: self.state(k) for k in self.chunks}

    def load_state_dict(self, state: dict) -> None:
        self.chunks = {int(k): dict(v) for k, v in state.items()}


class Local(Method):
    """Local learning (``method=local``, the default)."""


class SyntheticGradients(Method):
    """Each chunk but the last backpropagates ``weight * <ĝ_k, h_k>`` with its loss, ĝ_k = its predictor's guess
    (:class:`~locallearn.model.predictor.GradientPredictor`) of the message; the predictor is regressed (mean squared
    error, in units of the gradient times B*T) onto the message that arrives one step later, for the output it was
    sent for. Logs ``train/synthetic/cosine/chunk{k}``: the cosine between the predictor's guess and the true message,
    on that output, before the predictor trains on it (a sample it has not seen), and ``.../norm_ratio/chunk{k}``,
    the guess's norm over the message's.
    """

    name = "synthetic"
    sends = True
    uses_output = True

    def metric_names(self, k, K):
        return [f"train/synthetic/cosine/chunk{k + 1}", f"train/synthetic/norm_ratio/chunk{k + 1}"] if k < K - 1 else []

    def with_loss(self, net, k, h):
        if k == len(net) - 1:
            return None
        self._output = h.detach()
        with torch.no_grad():
            guess = net.predictors[k](h) / (h.shape[0] * h.shape[1])  # ĝ: (B, T, C)
        return self.weight * (h * guess).sum()

    def apart(self, net, k):
        # The regression on a graph of its own: in sequential mode the chunk's graph is freed before it is built.
        if k == len(net) - 1:
            return
        state = self.chunks.setdefault(k, {})
        if "grad" in state and "h" in state:
            tokens = state["h"].shape[0] * state["h"].shape[1]
            guess, target = net.predictors[k](state["h"]), state["grad"] * tokens  # (B, T, C) each
            g, t = guess.detach().flatten().float(), target.flatten().float()
            names = self.metric_names(k, len(net))
            self.metrics[names[0]] = F.cosine_similarity(g, t, dim=0)
            self.metrics[names[1]] = torch.linalg.vector_norm(g) / torch.linalg.vector_norm(t).clamp_min(1e-30)
            yield F.mse_loss(guess, target)
        state.pop("grad", None)
        state["h"] = self._output


class DelayedGradients(Method):
    """Each chunk but the last backpropagates ``weight * <δ_k, ĥ_k>``: δ_k the message of the previous step, ĥ_k its
    output on that step's input, recomputed now (features replay) under the dropout masks of that step."""

    name = "delayed"
    sends = True

    def start(self, net, k, x):
        if k == len(net) - 1:
            return
        saved = x if k == 0 else {i: v.detach() for i, v in x.items() if isinstance(i, int)}
        device = x.device if k == 0 else next(iter(saved.values())).device
        self._input = saved, dropout_state(device)

    def apart(self, net, k):
        if k == len(net) - 1:
            return
        state = self.chunks.setdefault(k, {})
        if "grad" in state and "x" in state:
            device = state["grad"].device
            with replaying(state["rng"], device):
                _, h, _ = net.forward_chunk(k, state["x"], head=False)  # (B, T, C), with today's weights
            yield self.weight * (h * state["grad"]).sum()
        state.pop("grad", None)
        state["x"], state["rng"] = self._input
