"""`fedsens methods` and the `--method` / `-o KEY=VALUE` options train, sweep and compare share.

The registry is imported only when a value is checked or a list printed (it imports torch), so
`fedsens --help` stays quick; `fedsens methods` lists the names.
"""

from __future__ import annotations

import typer

from fedsens.commands._common import clean_errors

OPTION_HELP = "A method option KEY=VALUE (repeat for several), e.g. -o scale=0.5; `fedsens methods` lists them."


def parse_method_name(value: str) -> str:
    """A registered method's name; the registry is read only when a value is checked (it imports torch)."""
    from fedsens.personalize.methods import names

    if value in names():
        return value
    raise typer.BadParameter(f"unknown method {value!r}; choose one of {', '.join(names())}")


def method_option(default: str | None = None, help: str = "The personalized-FL method (`fedsens methods`).") -> str:
    # `parser=` is the custom-type hook every typer release we admit has (0.16 to 0.29): `click_type=` is gone
    # from typer 0.29, and typer 0.26+ vendors click instead of installing it, so fedsens never imports click.
    return typer.Option(default, "--method", parser=parse_method_name, metavar="METHOD", help=help)


def options_option(help: str = OPTION_HELP) -> list[str]:
    return typer.Option(None, "-o", "--option", metavar="KEY=VALUE", help=help)


def describe(name: str) -> str:
    """One method's block: summary, parts kept local, paper, and its options with defaults and help."""
    from fedsens.personalize.methods import method_class, registry

    cls = method_class(name)
    fields = registry.option_fields(cls)
    parts = cls.parts if cls.parts is not None else "what --personalize names (none by default)"
    if "local" in fields:
        parts += " (+ the parts in -o local=...)"
    row = f" (row {cls.paper_row} of its main table)" if cls.paper_row is not None else ""
    lines = [f"{name}: {cls.summary}", f"    local: {parts}", f"    paper: {cls.paper or '-'}{row}"]
    for key, (field, kind) in fields.items():
        default = field.default if field.default is not None else "none"
        lines.append(f"    -o {key}={default}  ({registry.type_name(kind)}) {field.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)


@clean_errors
def methods(
    name: str | None = typer.Argument(None, help="Show only this method."),
) -> None:
    """List every method: the parts it keeps local, its options (-o KEY=VALUE) with defaults, and its paper."""
    from fedsens.personalize.methods import method_class, names

    shown = [method_class(name).name] if name else names()
    typer.echo("\n\n".join(describe(n) for n in shown))
