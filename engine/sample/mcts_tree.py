"""The search tree of scored decoding (`engine.sample.mcts`): its settings, nodes, selectors and expansion.

One node is one token prefix (the prompt is the root). A node is *expanded* once, from the model's next-token
distribution at its prefix: context-sensitive tree building keeps only the tokens the grammar allows there (the
sampler's constraints, applied by the family's ``next_token_logits``), the ``tree_width`` most likely of them, and
only the top one when it alone carries at least ``top_child_cutoff`` of the probability (a position the model is
sure about, such as most of the CIF's tags, then costs the tree no width). Priors are the kept children's
probabilities renormalised.

Selectors (Q = mean backed-up reward of a child, N = visits of the parent, n = visits of the child, P = prior):

- ``puct``: Q + c * P * sqrt(N) / (1 + n) (AlphaZero's rule; CrystaLLM's default, c = 5); an unvisited child
  counts as its parent's Q ("first-play urgency": with Q = 0 a rare but good branch waits for many visits);
- ``uct``: Q + c * sqrt(ln N / n); an unvisited child goes first (the likeliest of them);
- ``greedy``: the highest Q; an unvisited child counts as its parent's Q, ties go to the higher prior.

This module holds no model and no chemistry: it is plain bookkeeping that the tests drive with fixed numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from engine.lab.errors import ConfigError

SELECTORS = ("puct", "uct", "greedy")


@dataclass(frozen=True)
class MCTSConfig:
    """Knobs of the search; defaults are CrystaLLM's published ones where it has them."""

    simulations: int = 200
    """Number of simulations (select -> expand -> roll out -> back up)."""
    tree_width: int = 10
    """Most children a node gets (the likeliest grammatical tokens)."""
    max_depth: int = 1000
    """Most tokens below the prompt at which nodes are still expanded; deeper leaves are only rolled out from."""
    selector: str = "puct"
    """``puct``, ``uct`` or ``greedy`` (module docstring)."""
    c: float = 5.0
    """Exploration constant of PUCT / UCT (dimensionless; rewards lie in [0, 1])."""
    rollouts: int = 1
    """Completions decoded together (one batch, KV cache) from a new leaf per simulation."""
    top_child_cutoff: float = 0.99
    """When the likeliest child has at least this probability it is the only child (context-sensitive width)."""
    reward_k: float = 2.0
    """Reward constant k (1/eV for energy scores): reward = 1 / (1 + exp(k * (score - reference)))."""
    bond_length_cutoff: float = 1.0
    """Smallest bond-length acceptability score (fraction of CrystalNN bonds of plausible length) a CIF needs,
    with formula, multiplicity and space-group consistency, to be valid and rewarded (CrystaLLM: 1.0)."""
    seed: int = 1337
    """Seed of the rollouts (rollout r of simulation s uses the sampler's stream ``s * rollouts + r``)."""
    n_best: int = 10
    """How many of the best distinct valid crystals form the output sample set."""

    def check(self) -> MCTSConfig:
        """Raises ConfigError (one line naming the setting) on an impossible value; returns self."""
        positive = {"simulations": self.simulations, "tree_width": self.tree_width, "max_depth": self.max_depth,
                    "rollouts": self.rollouts, "n_best": self.n_best}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"mcts {name} = {value!r} must be a whole number >= 1")
        if self.selector not in SELECTORS:
            raise ConfigError(f"mcts selector {self.selector!r} is not one of {', '.join(SELECTORS)}")
        for name in ("c", "reward_k"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"mcts {name} = {value!r} must be a finite number > 0")
        if not (0.0 < self.top_child_cutoff <= 1.0):
            raise ConfigError(f"mcts top_child_cutoff = {self.top_child_cutoff!r} must be in (0, 1]")
        if not (math.isfinite(self.bond_length_cutoff) and 0.0 <= self.bond_length_cutoff <= 1.0):
            raise ConfigError(f"mcts bond_length_cutoff = {self.bond_length_cutoff!r} must be in [0, 1]")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class Node:
    """One prefix of the tree: the token that led here, its prior, visits and summed backed-up reward."""

    token: int | None
    """Token appended to the parent's prefix (None at the root)."""
    parent: Node | None
    prior: float = 1.0
    """Probability of ``token`` among its siblings (renormalised over the kept children)."""
    depth: int = 0
    """Tokens below the prompt."""
    visits: int = 0
    value_sum: float = 0.0
    children: list[Node] = field(default_factory=list)
    expanded: bool = False
    terminal: bool = False
    """The prefix ends a CIF (nothing to expand; the prefix itself is the completed text)."""

    @property
    def q(self) -> float:
        """Mean backed-up reward (0 before the first visit)."""
        return self.value_sum / self.visits if self.visits else 0.0

    def prefix(self, root_ids: list[int]) -> list[int]:
        """The token ids of this node: the prompt's, then the tokens down the tree."""
        tokens, node = [], self
        while node.parent is not None:
            tokens.append(node.token)
            node = node.parent
        return root_ids + tokens[::-1]


def expand(node: Node, logits: torch.Tensor, config: MCTSConfig, temperature: float, top_k: int | None = 0,
           nucleus: float = 1.0) -> list[Node]:
    """Give ``node`` its children from next-token ``logits`` (V,) (forbidden tokens at -inf).

    Children are tokens the rollouts could draw: grammatical, within the sampler's ``top_k`` and nucleus
    (``nucleus`` = top-p) filters, at most ``tree_width`` of them, only the top one when its probability (after
    the filters) reaches ``top_child_cutoff``; priors are their probabilities renormalised. A node whose grammar
    allows nothing gets no children and becomes terminal (its rollouts then decide its value).
    """
    scaled = logits.float() / max(temperature, 1e-6)  # (V,); greedy decoding keeps the sharpest prior
    probs = torch.softmax(scaled, dim=-1)  # (V,)
    probs, order = probs.sort(descending=True)  # (V,), (V,)
    if top_k:
        probs[top_k:] = 0.0
    if nucleus < 1.0:  # the smallest prefix whose mass reaches top-p, as the sampler keeps
        probs = probs.masked_fill(probs.cumsum(-1) - probs > nucleus, 0.0)
    probs = probs / probs.sum().clamp_min(1e-30)
    width = min(config.tree_width, probs.numel())
    top_p, top_i = probs[:width], order[:width]  # (W,), (W,)
    keep = top_p > 0
    top_p, top_i = top_p[keep], top_i[keep]
    if len(top_p) and float(top_p[0]) >= config.top_child_cutoff:
        top_p, top_i = top_p[:1], top_i[:1]
    total = float(top_p.sum())
    node.children = [Node(int(t), node, float(p) / total, node.depth + 1) for p, t in zip(top_p, top_i)]
    node.expanded = True
    if not node.children:
        node.terminal = True
    return node.children


def select_child(node: Node, config: MCTSConfig) -> Node:
    """The child of an expanded ``node`` the selector picks (ties: the first, i.e. the likeliest)."""
    kids = node.children
    if config.selector == "puct":
        root_n = math.sqrt(max(node.visits, 1))
        return max(kids, key=lambda ch: (ch.q if ch.visits else node.q)
                   + config.c * ch.prior * root_n / (1 + ch.visits))
    if config.selector == "uct":
        unvisited = [ch for ch in kids if ch.visits == 0]
        if unvisited:
            return max(unvisited, key=lambda ch: ch.prior)
        log_n = math.log(max(node.visits, 1))
        return max(kids, key=lambda ch: ch.q + config.c * math.sqrt(log_n / ch.visits))
    return max(kids, key=lambda ch: (ch.q if ch.visits else node.q, ch.prior))


def backup(node: Node | None, value: float) -> None:
    """Add one visit with ``value`` to ``node`` and every ancestor."""
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


def reward_of(score: float, reference: float, k: float) -> float:
    """Reward in (0, 1) of a score (lower is better): 1 / (1 + exp(k * (score - reference))); 0.5 at the
    reference, rising towards 1 as the score falls below it."""
    z = max(-60.0, min(60.0, k * (score - reference)))
    return 1.0 / (1.0 + math.exp(z))


def iter_nodes(root: Node):
    """Every node of the tree, depth first."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)
