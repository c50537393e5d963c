"""The option table: each generation setting is declared once, on its `Request` field (`option(...)` in the field's
metadata), with how every surface shows it: the name messages give it, infer.py's flag and help, AUTOMATIC1111's
API field and infotext key with their conversions, whether it takes one value per image, and whether a second pass
(hires fix, cascade) starts without it.

The surfaces loop over the table: infer.py's flags and `python -m latentgen.eval`'s (`add_flags`, `from_args`), the
server's request model and its reading (`api_fields`, `from_api`), the A1111 text written and read back
(`latentgen.generation.infotext`), the worker's batching and the second passes (`per_image`, `resets`), and the
reference page docs/options.md (`markdown`). Settings that are themselves dataclasses of options (`Hires`,
`Upscale`, `Apg`) are groups: their fields carry options too.

A new option is its field with its `option(...)`, and its use in the sampler. Where A1111 spells a setting across
several fields or keys (the size, the sampler and its schedule, the hires fix), `spelt` says where that spelling is
read and written; those few are written by hand in `latentgen.server.a1111` and `latentgen.generation.infotext`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from latentgen.errors import UserError

MISSING = dataclasses.MISSING  # a field without a default


class _Same:
    def __repr__(self):
        return "SAME"


SAME = _Same()  # api_default: the field's own default


@dataclass(frozen=True)
class Option:
    label: str  # what messages call it: "steps"
    help: str = ""  # one line: --help, the API schema, docs/options.md
    flag: str | None = None  # infer.py's flag
    cli: Mapping[str, Any] = field(default_factory=dict)  # argparse keywords beyond name, help, dest and default
    from_flag: Callable[[Any], Any] | None = None  # the flag's value -> the field's (A1111's clip skip count, ...)
    api: str | None = None  # the field of the server's request body (A1111's name where A1111 has the setting)
    api_default: Any = SAME  # A1111's default where it differs from ours (steps: 50)
    api_type: Any = None  # the body field's type where it is not the Python field's
    from_api: Callable[[Any], Any] | None = None  # the body's value -> the field's (A1111's -1 seed -> None, ...)
    text: str | None = None  # the key in A1111's `parameters` text
    to_text: Callable[[Any], Any] | None = None  # the field's value -> the text's (None: not written)
    from_text: Callable[[str], Any] | None = None  # the text's value -> the field's
    always: bool = False  # written into the text even at its default (Steps, Seed, CFG scale)
    per_image: bool = False  # one value for all images, or a list of one per image
    resets: bool = False  # a second pass (hires fix, cascade) starts without it
    recorded: bool = True  # in an image's metadata (inputs such as the init image are files, named apart)
    group: type | None = None  # a settings dataclass whose own fields are options (Hires, Upscale, Apg)
    off_flag: str | None = None  # a group's flag that turns it off (--no-apg)
    text_fields: bool = False  # a group whose fields' text keys are written and read with its own (RP Ratios, ...)
    spelt: str = ""  # where a surface spells it otherwise, or why a surface lacks it (docs/options.md)

    def name(self, surface: str | None) -> str:
        """What a surface calls it: infer.py its flag ("cli"), the server its body field ("api"), else the label."""
        return {"cli": self.flag, "api": self.api}.get(surface or "") or self.label


def option(label: str, **kwargs) -> dict:
    """A field's metadata declaring its `Option`: `field(default=..., metadata=option("steps", flag=...))`."""
    return {"option": Option(label, **kwargs)}


def table(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The options of a dataclass (a Request or a group), in field order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def option_of(cls, name: str) -> Option:
    return next(opt for f, opt in table(cls) if f.name == name)


def per_image_fields(cls) -> list[str]:
    return [f.name for f, opt in table(cls) if opt.per_image]


def reset_fields(cls) -> dict[str, Any]:
    """What a second pass starts from instead of the first's values: each such field's default."""
    return {f.name: _default(f) for f, opt in table(cls) if opt.resets}


def names(cls, surface: str | None) -> dict[str, str]:
    """Every field's name on a surface ("cli", "api", None: the labels), groups' fields as "group.field"."""
    out = {}
    for f, opt in table(cls):
        out[f.name] = opt.name(surface)
        if opt.group is not None and surface == "cli" and not opt.flag:  # the flag that turns it on
            out[f.name] = next(o.flag for _, o in table(opt.group) if o.flag)
        if opt.group is not None:
            out |= {f"{f.name}.{sf.name}": sopt.name(surface) for sf, sopt in table(opt.group)}
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _kind(f: dataclasses.Field, opt: Option) -> type | None:
    """The scalar type of a field (from its default), for argparse and the text."""
    default = _default(f)
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float, str)):
        return type(default)
    return opt.cli.get("type")


# ----------------------------------------------------------------------------------------------------------------
# The command line


def _flags(cls) -> Iterator[tuple[dataclasses.Field, Option, dataclasses.Field | None, Option | None]]:
    """(field, option, group field, group option) for every option with a flag, groups' fields included."""
    for f, opt in table(cls):
        if opt.group is not None:
            for sf, sopt in table(opt.group):
                if sopt.flag:
                    yield sf, sopt, f, opt
        elif opt.flag:
            yield f, opt, None, None


def add_flags(parser, cls, only: set[str] | None = None) -> None:
    """The options' flags on an argparse parser (`only`: these fields); a flag left out keeps the field's default."""
    for f, opt, gf, gopt in _flags(cls):
        if only is not None and (gf or f).name not in only:
            continue
        kwargs = dict(opt.cli)
        kind = _kind(f, opt)
        if kind is bool and "action" not in kwargs:
            kwargs["action"] = "store_true"
        elif "action" not in kwargs:
            kwargs.setdefault("type", kind)
        default = _default(f)
        shown = f" (default: {default})" if default not in (None, False, MISSING, "") and gf is None else ""
        parser.add_argument(opt.flag, dest=_dest(opt.flag), help=opt.help + shown,
                            default=False if kwargs.get("action") == "store_true" else None, **kwargs)
    for f, opt in table(cls):
        if opt.off_flag and (only is None or f.name in only):
            parser.add_argument(opt.off_flag, dest=_dest(opt.off_flag), action="store_true",
                                help=f"{opt.label} off (its defaults are the model's own otherwise)")


def from_args(args, cls, only: set[str] | None = None) -> dict[str, Any]:
    """The fields the parsed flags give (flags left out: nothing, so the field keeps its default)."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for f, opt, gf, gopt in _flags(cls):
        if only is not None and (gf or f).name not in only:
            continue
        value = getattr(args, _dest(opt.flag), None)
        if value is None or value is False:
            continue
        value = opt.from_flag(value) if opt.from_flag else value
        if gf is None:
            out[f.name] = value
        else:
            groups.setdefault(gf.name, {})[f.name] = value
    for f, opt in table(cls):
        if opt.group is None or (only is not None and f.name not in only):
            continue
        given = groups.get(f.name)
        if opt.off_flag and getattr(args, _dest(opt.off_flag), False):
            if given:
                raise UserError(f"{opt.off_flag} turns {opt.label} off; give it without "
                                + ", ".join(o.flag for sf, o in table(opt.group) if sf.name in given))
            out[f.name] = False
        elif given:  # a group that cannot be turned off by a flag is turned on by its first field's (--hires-scale)
            first = [] if opt.off_flag else table(opt.group)[:1]
            required = [(sf, o) for sf, o in table(opt.group) if _default(sf) is MISSING or (sf, o) in first]
            missing = [o.flag for sf, o in required if sf.name not in given]
            if missing:
                raise UserError(f"{', '.join(o.flag for sf, o in table(opt.group) if sf.name in given)} "
                                f"need{'s' if len(given) == 1 else ''} {' and '.join(missing)}")
            out[f.name] = opt.group(**given)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The server's request body


def api_fields(cls) -> dict[str, tuple[Any, Any, str]]:
    """(type, default, help) of each option's body field (name: `Option.api`); a group's is an object of its
    fields (or false, for a group that can be turned off)."""
    out = {}
    for f, opt in table(cls):
        if not opt.api:
            continue
        if opt.group is not None:
            kind = dict[str, Any] | bool | None if opt.off_flag else dict[str, Any] | None
            out[opt.api] = (opt.api_type or kind, None, opt.help)
            continue
        default = _default(f) if opt.api_default is SAME else opt.api_default
        kind = opt.api_type or _kind(f, opt)
        out[opt.api] = (kind if default is not None else kind | None, default, opt.help)
    return out


def from_api(body, cls) -> dict[str, Any]:
    """The fields a request body's option fields give (`api_fields`); one left out or null keeps the field's
    default."""
    out = {}
    for f, opt in table(cls):
        value = getattr(body, opt.api, None) if opt.api else None
        if value is None:
            continue
        out[f.name] = opt.from_api(value) if opt.from_api else value
    return out


# ----------------------------------------------------------------------------------------------------------------
# A1111's text


def text_items(meta: Mapping[str, Any], cls) -> Iterator[tuple[str, Any]]:
    """(key, value) of every option with a text key that an image's metadata holds (groups by their own key; the
    groups A1111 spells over several keys, the hires fix and the cascade, are `infotext`'s)."""
    for f, opt in table(cls):
        value = meta.get(f.name)
        if opt.text:
            yield from _text_item(f, opt, value)
        if opt.group is not None and opt.text_fields and value:
            fields = value if isinstance(value, Mapping) else dataclasses.asdict(value)
            for sf, sopt in table(opt.group):
                if sopt.text:
                    yield from _text_item(sf, sopt, fields.get(sf.name))


def _text_item(f, opt: Option, value) -> Iterator[tuple[str, Any]]:
    if opt.to_text is not None:
        value = opt.to_text(value)
    elif not opt.always and (value is None or value is False or value == _default(f)):
        value = None
    if value is not None:
        yield opt.text, value


def from_text(fields: Mapping[str, str], cls) -> tuple[dict[str, Any], set[str]]:
    """The fields that A1111 text keys give, and the keys read."""
    out: dict[str, Any] = {}
    used: set[str] = set()
    for f, opt in table(cls):
        if opt.group is not None and opt.text_fields and opt.text in fields:
            sub = {sf.name: _read(sf, sopt, fields[sopt.text]) for sf, sopt in table(opt.group)
                   if sopt.text and sopt.text in fields}
            out[f.name] = opt.group(**sub)
            used |= {opt.text} | {sopt.text for _, sopt in table(opt.group) if sopt.text in fields}
        elif opt.text and opt.text in fields:
            out[f.name] = _read(f, opt, fields[opt.text])
            used.add(opt.text)
    return out, used


def _read(f, opt: Option, text: str) -> Any:
    if opt.from_text is not None:
        return opt.from_text(text)
    kind = _kind(f, opt)
    if kind is bool:
        return text.strip().lower() == "true"
    return kind(text) if kind else text


# ----------------------------------------------------------------------------------------------------------------
# The reference page


PAGE = """# Options

Every generation option on every surface: the Python API (`LatentPipeline.__call__` and `Request`, diffusers'
names), `infer.py`'s flags, the server's HTTP API (AUTOMATIC1111's field names where A1111 has the setting) and the
`parameters` text written into each image (A1111's keys). Generated from the option table
(`latentgen/generation/options.py`): `python -m latentgen.generation.reference > docs/options.md`; a test fails
when this page is stale.

A new option is two edits: its `Request` field with its `option(...)` (name, flag, help, API field, text key), and
its use in the sampler. Every surface above, replay, the server's batching and this page follow from the table.

"""


def page(cls) -> str:
    """docs/options.md (`python -m latentgen.generation.reference` prints it)."""
    return PAGE + markdown(cls)


def markdown(cls) -> str:
    """docs/options.md's table: every option on every surface."""
    rows = ["| option | Python (`Request`) | infer.py | HTTP API | A1111 text | |", "|---|---|---|---|---|---|"]

    def cell(value) -> str:
        return f"`{value}`" if value else "—"

    for f, opt in table(cls):
        notes = "; ".join(x for x in (opt.help, "one per image" if opt.per_image else "", opt.spelt) if x)
        if opt.group is not None:
            flags = ", ".join(f"`{o.flag}`" for _, o in table(opt.group) if o.flag)
            flags += f", `{opt.off_flag}`" if opt.off_flag else ""
            texts = cell(opt.text) if opt.text else ", ".join(f"`{o.text}`" for _, o in table(opt.group) if o.text)
            rows.append(f"| {opt.label} | `{f.name}` | {flags or '—'} | {cell(opt.api)} | {texts} | {notes} |")
            for sf, sopt in table(opt.group):
                api = f"{opt.api}.{sf.name}" if opt.api else sopt.api
                rows.append(f"| {sopt.label} | `{f.name}.{sf.name}` | {cell(sopt.flag)} | {cell(api)} | "
                            f"{cell(sopt.text)} | {sopt.help} |")
        else:
            rows.append(f"| {opt.label} | `{f.name}` | {cell(opt.flag)} | {cell(opt.api)} | {cell(opt.text)} | "
                        f"{notes} |")
    return "\n".join(rows) + "\n"
