"""``minfm plugins``: every plugin with its commands, every component with its config fields.

Broken plugins are listed with the reason they were skipped (an entry point named like a
plugin already loaded by its distribution-qualified name, ``dist:name``), and the plugins
MINFM_DISABLE_PLUGINS blocks as blocked; a component whose
lazy ``"module:attr"`` factory does not import, or cannot take the keywords the engine
passes, is listed as broken with the reason (``minfm check`` refuses a recipe that selects
it); a name several plugins claim, which none of them gets, is listed as contested.
"""

from __future__ import annotations

import argparse
import json

from ..config import describe_fields
from ..plugins import PluginState, load_plugins
from ..registry import KINDS


def register(sub) -> None:
    p = sub.add_parser("plugins", help="list installed plugins and the components they register")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _commands(state: PluginState) -> dict[str, list[str]]:
    """Each plugin's subcommands (``minfm`` asks the hook when it builds its parser; else ask here)."""
    if not state.commands_added:
        scratch = argparse.ArgumentParser(prog="minfm").add_subparsers()
        state.pm.hook.register_commands(subparsers=scratch)
        state.commands_added = True
    return state.commands


def collect() -> dict:
    state = load_plugins()
    commands = _commands(state)
    kinds = {}
    for kind in KINDS:
        kinds[kind] = [
            {
                "name": c.name,
                "plugin": c.plugin,
                "doc": c.doc,
                "fields": describe_fields(c.config) if c.config is not None else [],
                "broken": c.factory_problem(),
            }
            for c in state.registry.components(kind)
        ]
    from ..recipe.schema import RunSection, SampleSection, TrainSection

    return {
        "plugins": [{"name": n, "origin": o, "commands": commands.get(n, [])} for n, o in sorted(state.origins.items())],
        "failed": [{"name": n, "error": e} for n, e in sorted(state.failures.items())],
        # installed but kept from loading by MINFM_DISABLE_PLUGINS (not imported: what they register is unknown)
        "blocked": list(state.registry.blocked),
        "contested": [{"kind": k, "name": n, "plugins": who} for (k, n), who in sorted(state.registry.contested().items())],
        "kinds": kinds,
        # The recipe's own numeric sections carry ranges too; listed so one command shows them all.
        "sections": {name: describe_fields(cls) for name, cls in
                     (("run", RunSection), ("train", TrainSection), ("sample", SampleSection))},
    }


def _field_line(f: dict) -> str:
    default = "required" if f["required"] else f"= {f['default']!r}"
    rng = f"  [{f['range']}]" if f.get("range") else ""
    return f"      {f['name']}: {f['type']} {default}  # {f['doc']}{rng}"


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print("plugins:")
    for p in info["plugins"]:
        print(f"  {p['name']:<18} {p['origin']}")
        if p["commands"]:
            print(f"      commands: {', '.join('minfm ' + c for c in p['commands'])}")
    for f in info["failed"]:
        print(f"  {f['name']:<18} BROKEN: {f['error']}")
    for name in info["blocked"]:
        print(f"  {name:<18} blocked (MINFM_DISABLE_PLUGINS)")
    for c in info["contested"]:
        print(f"  {c['kind']} {c['name']!r} CONTESTED: registered by {', '.join(c['plugins'])}, so by none of them "
              "(MINFM_DISABLE_PLUGINS picks one)")
    for kind, comps in info["kinds"].items():
        print(f"\n[{kind}]")
        if not comps:
            print("  (none)")
        for c in comps:
            print(f"  {c['name']:<18} {c['plugin']:<12} {c['doc']}")
            if c["broken"]:
                print(f"      BROKEN: {c['broken']}")
            for f in c["fields"]:
                print(_field_line(f))
    for name, fields in info["sections"].items():
        print(f"\n[{name}]  (recipe section)")
        for f in fields:
            print(_field_line(f))
    return 0
