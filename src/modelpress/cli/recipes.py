"""`modelpress recipes`: the built-in recipes, their passes and what they are for."""

from __future__ import annotations

from modelpress.cli.common import AsJson, print_json, print_rich


def recipes(as_json: AsJson = False) -> None:
    """List the built-in recipes."""
    from modelpress.compress.recipe import builtin_recipes, load_recipe

    rows = []
    for name in sorted(builtin_recipes()):
        r = load_recipe(name)
        rows.append({"name": name, "passes": [p.name for p in r.passes], "description": " ".join(r.spec.description.split())})
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title="built-in recipes")
    for col in ("name", "passes", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["passes"]) or "(export only)", r["description"])
    print_rich(table)
