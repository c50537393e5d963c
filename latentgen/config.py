"""Typed configs: a @dataclass filled from a YAML file, then `key=value` overrides from the command line.

OmegaConf does the layering and type conversion (as latent-diffusion's main.py layers configs); this module
turns its errors into one line that names the key, and suggests the nearest valid key for a misspelt one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentgen.errors import UserError

T = TypeVar("T")


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config dataclass accepts (nested dataclasses expanded)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            keys += valid_keys(sub, key + ".")
    return keys


def _check_keys(cls: type, data: Any, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping of keys to values")
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in names:
            candidates = [prefix + n for n in names]
            match = difflib.get_close_matches(prefix + str(key), valid_keys(cls, prefix) + candidates, n=1,
                                              cutoff=0.6)
            hint = f"; did you mean '{match[0]}'?" if match else "; --keys lists the valid ones"
            raise UserError(f"{where}: unknown config key '{prefix}{key}'{hint}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and value is not None:
            _check_keys(sub, value, f"{prefix}{key}.", where)


def _parse_overrides(overrides: Sequence[str]) -> dict:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, ValueError) as err:  # the same key given as a list, then as a mapping
        key = getattr(err, "full_key", None) or "?"
        raise UserError(f"cannot apply the overrides at key '{key}': {str(err).splitlines()[0]}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """`cls` filled from the YAML file at `path` and then `overrides`; every `check()` method is then called."""
    layers = []
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"config {path} is a folder; give a YAML file (see configs/)")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        import yaml

        try:
            data = OmegaConf.to_container(OmegaConf.load(path)) or {}
        except (OmegaConfBaseException, ValueError, OSError, yaml.YAMLError) as err:
            raise UserError(f"cannot read config {path}: {str(err).splitlines()[0]}") from None
        _check_keys(cls, data, "", str(path))
        layers.append(data)
    extra = _parse_overrides(overrides)
    _check_keys(cls, extra, "", "command line")
    layers.append(extra)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), *layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        raise UserError(f"config key '{key}': {msg}") from None
    _check_all(config)
    return config


def _check_all(config: Any) -> None:
    """Call `check()` on every nested config dataclass, innermost first."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            _check_all(value)
    check = getattr(config, "check", None)
    if check is not None:
        check()


def to_dict(config: Any) -> dict:
    """A config dataclass as plain data (to save beside the weights)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(config)))
