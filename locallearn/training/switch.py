"""Local-to-global switch and its optional EWC anchor.

From ``at`` x total steps on, gradients cross chunk boundaries and training continues end to end on
the last chunk's loss (auxiliary losses kept with weight ``aux_weight``), with the total gradient
norm clipped as in end-to-end training. With ``ewc_lambda > 0``, the diagonal Fisher of each earlier
chunk's local loss is estimated at the switch, and a penalty ``ewc_lambda / 2 * sum F (theta -
theta_switch)^2`` anchors that chunk's parameters to their values at the switch (elastic weight
consolidation, Kirkpatrick et al. 2017).

The Fisher is per token: every token a local loss scores is one sample of the model's predictive
distribution, and F = mean over those tokens of (grad log p(y_t | context))^2, elementwise. The *true*
Fisher (``fisher=true``, the default) draws y_t from the model's own prediction: it is the Fisher
information EWC's Laplace approximation uses. The *empirical* Fisher (``fisher=empirical``) takes the
data's token instead; it is a different matrix wherever the model does not fit the data (Kunstner et
al. 2019, "Limitations of the empirical Fisher approximation"), which a local chunk at the switch does not.
"""

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from locallearn.errors import ConfigError
from locallearn.model.objectives import IGNORE

FISHER_KINDS = ("true", "empirical")
log = logging.getLogger(__name__)


@dataclass
class Switch:
    at: float | None = None  # fraction of trainer.max_steps where global training starts; None: never
    aux_weight: float = 0.0  # weight of the auxiliary (earlier chunks') losses in the global phase
    ewc_lambda: float = 0.0  # strength of the EWC anchor on earlier chunks; 0: off
    fisher: str = "true"  # true: targets sampled from the model; empirical: the data's targets
    fisher_batches: int = 4  # batches the Fisher is averaged over: the one at the switch and those after it

    def __post_init__(self):
        if self.at is not None and not 0.0 < self.at <= 1.0:
            raise ConfigError(f"switch.at={self.at} must lie in (0, 1] (a fraction of trainer.max_steps), "
                              f"or be null for no switch.")
        if self.aux_weight < 0 or self.ewc_lambda < 0:
            raise ConfigError(f"switch.aux_weight={self.aux_weight} and switch.ewc_lambda={self.ewc_lambda} "
                              f"must not be negative.")
        if self.fisher is True:  # YAML and Hydra read `true` as a boolean
            self.fisher = "true"
        if self.fisher not in FISHER_KINDS:
            raise ConfigError(f"switch.fisher={self.fisher} is not a kind of Fisher; use switch.fisher=true (targets "
                              f"sampled from the model) or switch.fisher=empirical (the data's targets).")
        n = self.fisher_batches
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"switch.fisher_batches={n} must be a whole number of at least 1 (the batch at the "
                              f"switch and the training batches after it).")

    def step(self, max_steps: int) -> int | None:
        """The first global step (a step index), or None."""
        return None if self.at is None else int(round(self.at * max_steps))


def token_terms(logits, targets, ignore: int = IGNORE, extra=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tokens a local loss scores, as the predictions of them whose log-likelihoods it sums.

    ``logits`` (B, T, V) and ``targets`` (B, T) (``ignore`` where there is no loss: mlm and span score
    the masked positions only) -> ``[(logits (N, V), targets (N,))]``. ``extra``: a second prediction of
    the same N tokens, in the same order (span's span-boundary network): a span token's loss is MLM + SBO,
    so its log-likelihood is the sum of the two and it stays one sample.
    """
    where = targets != ignore
    terms = [(logits[where], targets[where])]
    if extra is not None:
        if extra[0].shape[0] != terms[0][0].shape[0]:
            raise ValueError(f"the second prediction covers {extra[0].shape[0]} tokens, the loss {where.sum()}")
        terms.append(extra)
    return terms


class FisherDiagonal:
    """Running per-token estimate of the diagonal Fisher of several losses (one per earlier chunk).

    ``reach``: loss key -> names of the parameters (of ``params``) that loss reaches. For loss k over
    N_k tokens (counted over every :meth:`add`): F_k = 1/N_k sum_t (grad log p_k(y_t | x_t))^2, y_t
    sampled from p_k (``kind="true"``) or the data's token (``"empirical"``). A parameter reached by
    several losses (blocks an overlap shares) gets the sum of their F_k, as EWC sums the Fishers of
    several tasks. Under data parallelism :meth:`result` sums tokens and squares over all processes,
    so every process gets the same F: that of the combined batches.

    Per-token gradients come from one forward per group of tokens (a sequence, or a prefix of one) and
    a vmapped backward (``is_grads_batched``) over ``rows`` one-hot cotangents at a time: a backward per
    token, batched (on model=small 1.05-1.25x faster than a ``retain_graph`` loop over the tokens; feeding
    causal models the prefix the tokens see saves another 1.4x).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], reach: dict, kind: str = "true", rows: int = 16):
        if kind not in FISHER_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {FISHER_KINDS}")
        self.params, self.reach, self.kind, self.rows = params, reach, kind, rows
        # float32 sums whatever the parameters' precision: many small squares add up
        self.sums = {key: {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
                     for key, names in reach.items()}
        self.tokens = dict.fromkeys(reach, 0)

    def log_likelihoods(self, terms, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N,) per token: the sum over ``terms`` of log p(y), y sampled or the data's."""
        total = 0
        for logits, targets in terms:
            logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
            if self.kind == "true":
                targets = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
            total = total + logp.gather(1, targets[:, None]).squeeze(1)
        return total

    def add(self, key, terms, generator: torch.Generator | None = None):
        """Add the tokens of one group (their graphs share a forward, e.g. one sequence) to loss ``key``."""
        names = self.reach[key]
        s = self.log_likelihoods(terms, generator)  # (N,)
        N = s.shape[0]
        self.tokens[key] += N
        if N == 0 or not names:
            return
        eye = torch.eye(N, device=s.device, dtype=s.dtype)
        for i in range(0, N, self.rows):
            grads = torch.autograd.grad(s, [self.params[n] for n in names], grad_outputs=eye[i:i + self.rows],
                                        retain_graph=True, is_grads_batched=True, allow_unused=True)
            for n, g in zip(names, grads):  # g: (rows, *shape), one gradient per token
                if g is not None:
                    self.sums[key][n] += (g.detach().float() ** 2).sum(0)

    def result(self) -> dict[str, torch.Tensor]:
        """Name -> F, the sum over the losses reaching that parameter of their per-token mean."""
        keys = list(self.reach)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = [t for key in keys for t in self.sums[key].values()]
            tokens = torch.tensor([float(self.tokens[k]) for k in keys], device=sums[0].device if sums else None)
            flat = torch.cat([t.flatten() for t in sums] + [tokens])
            dist.all_reduce(flat)
            for t, synced in zip(sums, torch._utils._unflatten_dense_tensors(flat[:-len(keys)], sums)):
                t.copy_(synced)
            self.tokens = {k: int(round(float(v))) for k, v in zip(keys, flat[-len(keys):])}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        for key in keys:
            for n, s in self.sums[key].items():
                fisher[n] += s / max(self.tokens[key], 1)
        return fisher


def estimate_fisher(net, params: dict[str, torch.nn.Parameter], batches, token_terms, kind: str,
                    sample_seed) -> FisherDiagonal:
    """The per-token Fisher of every earlier chunk's local loss of a :class:`ChunkedGPT` (still local).

    ``batches``: (step, prepared batch) pairs; ``token_terms(k, h, logits, prepared)``: chunk k's
    predictions of the tokens its loss scores (:func:`token_terms`); ``sample_seed(step, b, B)``: the seed
    for the true Fisher's targets of sequence b of B. The network runs in eval mode: the Fisher is that of
    its predictive distribution, and dropout would also draw from the run's random stream.
    """
    K = len(net)
    name_of = {id(p): n for n, p in params.items()}
    reach = {k: [name_of[id(p)] for p in net.trained_parameters(k) if id(p) in name_of] for k in range(K - 1)}
    fisher = FisherDiagonal(params, reach, kind)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        for step, batch in batches:
            B = batch.idx.shape[0]
            for b in range(B):
                g = torch.Generator(device).manual_seed(sample_seed(step, b, B)) if kind == "true" else None
                for piece in sequence_pieces(batch, b, fisher.rows, net.gpt.config.causal):
                    x = piece.idx
                    for k in range(K - 1):  # local: chunk k's loss reaches only what it trains
                        x, h, logits = net.forward_chunk(k, x)
                        fisher.add(k, token_terms(k, h, logits, piece), g)
    finally:
        net.train(was_training)
    return fisher


def sequence_pieces(batch, b: int, rows: int, causal: bool):
    """Sequence b of a prepared ``batch`` as groups of tokens whose per-token gradients share one forward:
    the whole sequence or, with causal attention, prefixes ending every ``rows`` positions, each scoring its
    last ``rows`` positions only. A token's loss depends on no later position, and a shorter graph is a
    cheaper backward: about 1.4x faster on model=small (T=64)."""
    one = type(batch)(*(t[b:b + 1] if t is not None else None for t in vars(batch).values()))  # (1, T) each
    if not causal:
        yield one
        return
    for i in range(0, one.idx.shape[1], rows):
        piece = type(one)(*(t[:, :i + rows] if t is not None else None for t in vars(one).values()))
        piece.targets = piece.targets.clone()
        piece.targets[:, :i] = IGNORE  # scored by the earlier pieces
        yield piece


class EWC:
    """Diagonal-Fisher anchor for a set of named parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], fisher: dict[str, torch.Tensor],
                 tokens: dict | None = None):
        self.params = params
        self.fisher = fisher
        self.tokens = tokens  # per loss, the tokens its Fisher averages (for the log; not needed to resume)
        self.anchor = {n: p.detach().clone() for n, p in params.items()}

    def penalty(self, strength: float):
        return 0.5 * strength * sum((f * (self.params[n] - self.anchor[n]) ** 2).sum() for n, f in self.fisher.items())

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor}

    @classmethod
    def from_state(cls, params, state) -> "EWC":
        ewc = cls(params, {n: f.to(params[n].device) for n, f in state["fisher"].items()})
        ewc.anchor = {n: a.to(params[n].device) for n, a in state["anchor"].items()}
        return ewc


def fisher_seed(seed: int, step: int, sequence: int) -> int:
    """Seed of the generator that samples the true Fisher's targets for one sequence of the combined batch
    at ``step``: independent of the process count, so data parallelism samples what one process would."""
    return (2_147_483_647 + (seed * 1_000_003 + step) * 65_537 + sequence) % (2 ** 63)


# -- at the switch ------------------------------------------------------------------------------------------

def earlier_chunk_params(net) -> dict[str, torch.nn.Parameter]:
    """The trunk parameters of every chunk but the last, by name: what EWC anchors."""
    names = {id(p): n for n, p in net.named_parameters()}
    trunk = [p for k in range(len(net) - 1) for m in net.trunk_modules(k) for p in m.parameters()]
    return {names[id(p)]: p for p in trunk}


def chunk_token_terms(net, k, h, logits, prepared):
    """Chunk k's predictions of the tokens its local loss scores (see :func:`token_terms`)."""
    extra = None
    if net.extra is not None:  # span: the span-boundary network predicts the same masked tokens
        sbo_logits, (b, t) = net.extra[k](h, prepared)
        extra = (sbo_logits, prepared.targets[b, t])
    return token_terms(logits, prepared.targets, IGNORE, extra)


def start_global_phase(module, prepared) -> None:
    """At the switch step of ``module`` (a LocalLearner): anchor the earlier chunks (EWC, if asked), then remove
    the cut. The Fisher is each earlier chunk's per-token Fisher of its local loss (:func:`estimate_fisher`), on
    the batch at the switch and the ``switch.fisher_batches - 1`` training batches after it."""
    net, switch = module.net, module.switch
    if switch.ewc_lambda > 0 and len(net) > 1 and module.ewc is None:
        params = earlier_chunk_params(net)
        t0 = time.perf_counter()
        trainer = module.trainer
        rank = trainer.global_rank
        fisher = estimate_fisher(net, params, _fisher_batches(module, prepared),
                                 lambda k, h, logits, p: chunk_token_terms(net, k, h, logits, p), switch.fisher,
                                 lambda step, b, B: fisher_seed(module.seed, step, rank * B + b))
        module.ewc = EWC(params, fisher.result(), fisher.tokens)
        log.info("EWC: %s Fisher of chunks 1-%d from %s tokens (%d batches) in %.1f s", switch.fisher, len(net) - 1,
                 "/".join(map(str, fisher.tokens.values())), switch.fisher_batches, time.perf_counter() - t0)
    net.local = False


def _fisher_batches(module, prepared):
    """(step, prepared batch): the batch at the switch, then the next training batches as the run will draw them
    (:meth:`RandomWindows.batch` by step, masks from the step's generator): drawing them here takes nothing from
    the run, which then trains on exactly these batches and masks."""
    step, trainer = module.global_step, module.trainer
    yield step, prepared
    if module.switch.fisher_batches > 1:
        windows = trainer.train_dataloader.dataset  # a RandomWindows: batch n is a function of n
        for n in range(step + 1, step + module.switch.fisher_batches):
            batch = windows.batch(n).to(module.device)
            yield n, module.objective.prepare(batch, module.mask_generator(n, train=True), trainer.global_rank,
                                              trainer.world_size)
