"""Which rule updates which parameter: `[[optim.groups]]` tables, or `optim.name = "muon"` (Muon
for hidden matrices, AdamW for embeddings, the head, norms and biases), resolved into torch param
groups with every parameter in exactly one group.

A parameter's kind: `norm_bias` (1-D: norm gains, biases), `embedding` (an nn.Embedding's table,
or a model's declared input layers such as an image stem), `head` (the untied output projection;
a tied one is the embedding) and `hidden` (every other matrix, a mixture of experts' 3-D expert
weights included). Each torch group carries its rule (`optimizer`), its peak LR as a multiple of
`optim.lr` (`lr_mult`: the schedule scales every group alike) and the name of its table (`group`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from torch import nn

from kiln.config import OptimConfig
from kiln.errors import ConfigError
from kiln.parallel.tensors import plain_name


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """{clean parameter name: kind} of every trainable parameter of `model` (or a pipeline stage)."""
    inputs = tuple(getattr(model, "input_layers", ()))
    head = getattr(model, "head", None)
    head_weight = head.weight if isinstance(head, nn.Linear) else None
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    kinds: dict[str, str] = {}
    for raw, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = plain_name(raw)
        if p.dim() < 2:
            kinds[name] = "norm_bias"
        elif id(p) in embedding_params or any(name.startswith(f"{layer}.") for layer in inputs):
            kinds[name] = "embedding"
        elif head_weight is not None and p is head_weight:
            kinds[name] = "head"
        else:
            kinds[name] = "hidden"
    return kinds


@dataclass(frozen=True)
class GroupRule:
    """One group's selection and hyperparameters, resolved from the config."""

    name: str
    optimizer: str  # adamw | muon
    lr: float  # peak learning rate
    weight_decay: float  # -1: optim.weight_decay for matrices, 0 for 1-D tensors
    betas: tuple[float, float]
    params: tuple[str, ...] = ()
    kind: str = ""

    def selects(self, name: str, kind: str) -> bool:
        if self.kind:
            return kind == self.kind
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.params)


def group_rules(cfg: OptimConfig, mup: bool = False) -> list[GroupRule]:
    """The rules of `cfg`: its `[[optim.groups]]`, else Muon's default split, else under µP
    (`mup`) AdamW by kind (hidden matrices take the width's LR factor), else [] (AdamW with weight
    decay on matrices: `optim.param_groups`, as always)."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.groups:
        return [
            GroupRule(
                name=g.name,
                optimizer=g.optimizer,
                lr=(g.lr or (cfg.muon_lr if g.optimizer == "muon" else cfg.lr)) * g.lr_mult,
                weight_decay=g.weight_decay,
                betas=(g.betas[0], g.betas[1]) if g.betas else betas,
                params=tuple(g.params),
                kind=g.kind,
            )
            for g in cfg.groups
        ]
    if cfg.name == "muon" or mup:
        hidden = "muon" if cfg.name == "muon" else "adamw"
        return [
            GroupRule("hidden", hidden, cfg.muon_lr if hidden == "muon" else cfg.lr, -1.0, betas, kind="hidden"),
            GroupRule("embedding", "adamw", cfg.lr, -1.0, betas, kind="embedding"),
            GroupRule("head", "adamw", cfg.lr, -1.0, betas, kind="head"),
            GroupRule("norm_bias", "adamw", cfg.lr, 0.0, betas, kind="norm_bias"),
        ]
    return []


def assign(rules: list[GroupRule], kinds: dict[str, str], whole_model: bool = True) -> dict[str, list[str]]:
    """{rule name: parameter names}: each parameter to the one rule that selects it. Refused in one
    line: a parameter no rule (or two rules) select, a Muon rule given a 1-D tensor, and (for the
    whole model, not a pipeline stage) a rule that selects nothing."""
    out: dict[str, list[str]] = {r.name: [] for r in rules}
    for name, kind in kinds.items():
        chosen = [r for r in rules if r.selects(name, kind)]
        if not chosen:
            raise ConfigError(
                f"no [[optim.groups]] table selects parameter {name} (kind {kind}); every parameter needs "
                f"one: add its kind ({kind}) or a glob matching its name to a group"
            )
        if len(chosen) > 1:
            raise ConfigError(
                f"parameter {name} is selected by optim.groups {chosen[0].name} and {chosen[1].name}; "
                "each parameter belongs to exactly one group"
            )
        if chosen[0].optimizer == "muon" and kind == "norm_bias":
            raise ConfigError(
                f"optim.groups.{chosen[0].name} gives Muon the 1-D tensor {name}, which it cannot "
                "orthogonalise; select norms and biases by a group of kind norm_bias with optimizer adamw"
            )
        out[chosen[0].name].append(name)
    empty = [r for r in rules if not out[r.name] and r.params] if whole_model else []
    if empty:
        raise ConfigError(
            f"optim.groups.{empty[0].name}.params {list(empty[0].params)} matches no parameter of the model "
            f"(its parameters are named like {next(iter(kinds), '?')})"
        )
    return out


def lr_factor(kind: str, optimizer: str, width_mult: float) -> float:
    """µP's factor on a parameter's AdamW learning rate: 1 / m for hidden matrices (Muon's
    orthogonalised, shape-scaled update needs none), else 1."""
    return 1.0 / width_mult if kind == "hidden" and optimizer == "adamw" else 1.0


def torch_param_groups(
    model: nn.Module, cfg: OptimConfig, rules: list[GroupRule], width_mult: float = 1.0
) -> list[dict[str, Any]]:
    """`rules` applied to this rank's `model` as torch param groups: one per rule, decay and no
    decay (a rule's default weight decay spares 1-D tensors), µP's LR factor (`width_mult`) and
    parameter layout (a fused step takes one DTensor mesh at a time); empty ones are left out (a
    pipeline stage lacks some)."""
    kinds = parameter_kinds(model)
    members = {n: rule for rule, names in zip(rules, assign(rules, kinds, whole_model=False).values()) for n in names}
    groups: dict[tuple[str, float, float, object], dict[str, Any]] = {}
    for raw, p in model.named_parameters():
        name = plain_name(raw)
        if name not in kinds:
            continue
        rule = members[name]
        wd = rule.weight_decay if rule.weight_decay >= 0 else (cfg.weight_decay if p.dim() >= 2 else 0.0)
        lr = rule.lr * lr_factor(kinds[name], rule.optimizer, width_mult)
        key = (rule.name, wd, lr, getattr(p, "device_mesh", None))
        if key not in groups:
            groups[key] = {
                "params": [],
                "optimizer": rule.optimizer,
                "group": rule.name,
                "lr": lr,
                "lr_mult": lr / cfg.lr,
                "weight_decay": wd,
                "betas": rule.betas,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def describe_groups(rules: list[GroupRule], model: nn.Module, width_mult: float = 1.0) -> list[dict[str, Any]]:
    """What each rule holds in the whole model (a run records it, the console prints it); `lr`
    is the rule's peak, `hidden_lr` that of its hidden matrices where µP's factor moves it."""
    shapes = {plain_name(n): p.numel() for n, p in model.named_parameters()}
    kinds = parameter_kinds(model)
    out = []
    for rule, names in zip(rules, assign(rules, kinds).values()):
        factors = {lr_factor(kinds[n], rule.optimizer, width_mult) for n in names if kinds[n] == "hidden"}
        out.append(
            {
                "name": rule.name,
                "optimizer": rule.optimizer,
                "lr": rule.lr,
                "hidden_lr": rule.lr * factors.pop() if factors and factors != {1.0} else None,
                "weight_decay": rule.weight_decay,
                "betas": list(rule.betas) if rule.optimizer == "adamw" else None,
                "tensors": len(names),
                "parameters": sum(shapes[n] for n in names),
                "names": names,
            }
        )
    return out
