"""`fedsens methods` and the `--method` / `-o KEY=VALUE` options train, sweep and compare share.

The registry is imported only when a value is checked or a list printed (it imports torch), so
`fedsens --help` stays quick; `fedsens train --help` lists the method names from the registry.
"""

from __future__ import annotations

import click
import typer

from fedsens.commands._common import clean_errors

OPTION_HELP = "A method option KEY=VALUE (repeat for several), e.g. -o scale=0.5; `fedsens methods` lists them."


class MethodName(click.ParamType):
    """A registered method's name; the choices are read from the registry when first needed."""

    name = "method"

    def _names(self) -> list[str]:
        from fedsens.personalize.methods import names

        return names()

    def get_metavar(self, param, ctx=None) -> str:  # click 8.2+ passes ctx
        return "[" + "|".join(self._names()) + "]"

    def convert(self, value, param, ctx):
        if value in self._names():
            return value
        self.fail(f"unknown method {value!r}; choose one of {', '.join(self._names())}", param, ctx)


def method_option(default: str | None = None, help: str = "The personalized-FL method (`fedsens methods`).") -> str:
    return typer.Option(default, "--method", click_type=MethodName(), help=help)


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
