"""Built-in plugin 'knapformer': the KnapFormer sequence balancer (and the 'none' balancer).

Balancers re-route packed sequences between the ranks of a balance group so that every
GPU gets about the same compute; see docs/balancer.md. Nothing heavy is imported here.
"""

from __future__ import annotations

from minfm_core import hookimpl

from .config import KnapformerConfig, NoBalancerConfig


@hookimpl
def register_balancers(register):
    register("knapformer", "minfm_plugins.knapformer.route:KnapformerBalancer", KnapformerConfig)
    register("none", "minfm_plugins.knapformer.route:NoBalancer", NoBalancerConfig)


@hookimpl
def register_commands(subparsers):
    from .cli import add_parser

    add_parser(subparsers)


def _heads(den) -> int | None:
    for name in ("n_heads", "num_heads"):
        value = getattr(den, name, None)
        if isinstance(value, int):
            return value
    d_model, d_head = getattr(den, "d_model", None), getattr(den, "d_head", None)
    if isinstance(d_model, int) and isinstance(d_head, int) and d_head > 0:
        return d_model // d_head
    return None


@hookimpl
def check_recipe(recipe, world_size):
    cfg = recipe.config("balancer")
    if not isinstance(cfg, KnapformerConfig):
        return []
    from .spec import parse_bags

    spec = parse_bags(cfg.bags)  # valid: the config's validator parsed it already
    problems = []
    if world_size % spec.size:
        problems.append(
            f"balancer.bags: world size {world_size} is not divisible by the {spec.size} GPUs of bag spec "
            f"{cfg.bags!r} (S = sum of G x N)"
        )
    heads = _heads(recipe.config("model.denoiser"))
    # Every bag's G, not the largest's alone: with g2n1+g3n1 and 3 heads the G=2 bag failed at
    # its first forward, on its ranks only, while the others waited in collectives.
    bad = sorted({g for g in spec.bag_sizes if heads is not None and heads % g})
    if bad:
        problems.append(
            f"balancer.bags: the denoiser's {heads} attention heads are not divisible by the G = "
            f"{', '.join(map(str, bad))} GPUs of {'a bag' if len(bad) == 1 else 'bags'} in {cfg.bags!r} "
            "(Ulysses splits heads across a bag's GPUs)"
        )
    return problems
