"""The config's models, and their validation errors in a user's words.

Every part of a config (the core keys, each converter's options, the cluster
section, preprocess steps) is a :class:`ConfigModel`: frozen, unknown keys
refused. :func:`validated` validates a mapping against one and turns every
problem pydantic finds into ``(key path, message)``: the key path as the user
wrote it (``convert.steps[3].crop_pad.shape``, never a union member's name),
what was expected as a kind of value (``a list of 3 numbers``, ``a mapping
with `root```) and what was found, shown short. The declared types are read
from the models themselves, so a new option needs no message of its own.

Imports only pydantic and :mod:`niconv.errors`, so any module can use it.
"""
from __future__ import annotations

import datetime
import difflib
import os
import reprlib
import types
from typing import Annotated, Any, Literal, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError
from pydantic.fields import FieldInfo

from .errors import ConfigError


class ConfigModel(BaseModel):
    """Base of every part of a config: frozen (hashable, safe to share), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------ words


def did_you_mean(word: Any, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``word``, or ``""`` if none is close.

    Goes at the end of a message: ``unknown key 'exlude'; did you mean 'exclude'?``.
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


# a value's repr for messages, with bounded work: a few items of each list, a few levels deep
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 5, 5, 5, 5, 5
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60


def show(value: Any) -> str:
    """A value as written in a message: its repr, a few items and at most 80 characters."""
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def found(value: Any) -> str:
    """What kind of value a config holds, with the value: ``the string 'out/'``, ``the list [1, 2]``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value)"
    if isinstance(value, (int, float)):
        return f"the number {show(value)}"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"the date {value}"
    if isinstance(value, str):
        return f"the string {show(value)}" if value else "an empty string"
    if isinstance(value, (list, tuple)):
        return f"the list {show(list(value))}"
    if isinstance(value, dict):
        return f"the mapping {show(value)}"
    return show(value)


def _shown(value: Any) -> str:
    # a value of the right kind but not allowed is shown as is: "found -2", "found 'mirrored'"
    plain = isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != ""
    return show(value) if plain else found(value)


# ------------------------------------------------------------------------------ declared types


def _unwrap(tp: Any, meta: tuple = ()) -> tuple[Any, tuple]:
    """The type without ``Annotated`` and ``Optional``, and the metadata gathered on the way."""
    while True:
        if get_origin(tp) is Annotated:
            tp, *extra = get_args(tp)
            meta = (*meta, *extra)
            continue
        members = _members(tp)
        if members is not None and len(members) == 1:  # Optional[X]: null adds no key
            tp = members[0]
            continue
        break
    flat: list = []
    for m in meta:  # Annotated[int, Field(ge=1)]: the field's own constraints
        if isinstance(m, FieldInfo):
            flat += _field_meta(m)
        else:
            flat.append(m)
    return tp, tuple(flat)


def _field_meta(field: FieldInfo) -> list:
    meta = list(field.metadata)
    if field.discriminator is not None:
        d = field.discriminator
        meta.append(d if isinstance(d, Discriminator) else Discriminator(d))
    return meta


def _members(tp: Any) -> list | None:
    """The members of a union other than None, or None if ``tp`` is not a union."""
    if get_origin(tp) in (Union, types.UnionType):
        return [m for m in get_args(tp) if m is not type(None)]
    return None


def _discriminator(meta: tuple) -> Any:
    """The union's discriminator: a key name, a function of the value, or None."""
    return next((m.discriminator for m in meta if isinstance(m, Discriminator)), None)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(members: list, discriminator: Any) -> list[str]:
    """The tags that pick each member of a discriminated union, in declaration order."""
    tags: list[str] = []
    for m in members:
        inner, meta = _unwrap(m)
        if isinstance(discriminator, str) and _is_model(inner) and discriminator in inner.model_fields:
            tags += [str(v) for v in get_args(_unwrap(inner.model_fields[discriminator].annotation)[0])]
        tags += [t.tag for t in meta if isinstance(t, Tag)]
    return tags


def _member(members: list, discriminator: Any, tag: Any) -> Any:
    for m in members:
        if str(tag) in _tags([m], discriminator):
            return m
    return None


def _sequence_args(tp: Any) -> tuple | None:
    """The item types of a list or tuple type (``(X, Ellipsis)`` for any length), else None."""
    origin = get_origin(tp) or tp
    if origin in (list, tuple, set, frozenset) or (isinstance(origin, type) and origin is not str
                                                  and issubclass(origin, Sequence)):
        return get_args(tp) or (Any, Ellipsis)
    return None


def _fixed_length(tp: Any) -> int | None:
    args = _sequence_args(tp)
    if args is None or (get_origin(tp) or tp) is not tuple or Ellipsis in args:
        return None
    return len(args)


def _item(tp: Any, index: int) -> Any:
    args = _sequence_args(tp)
    if not args:
        return Any
    if Ellipsis in args or len(args) == 1:
        return args[0]
    return args[index] if index < len(args) else Any


def _bounds(meta: tuple, whole: bool) -> str:
    low = high = None
    for m in meta:
        if getattr(m, "ge", None) is not None:
            low = f"{m.ge}"
        if getattr(m, "gt", None) is not None:
            low = f"{m.gt + 1}" if whole else f"above {m.gt}"
        if getattr(m, "le", None) is not None:
            high = f"{m.le}"
        if getattr(m, "lt", None) is not None:
            high = f"{m.lt - 1}" if whole else f"below {m.lt}"
    if low is not None and high is not None and not low.startswith("above") and not high.startswith("below"):
        return f" from {low} to {high}"
    words = []
    if low is not None:
        words.append(low if low.startswith("above") else f"of at least {low}")
    if high is not None:
        words.append(high if high.startswith("below") else f"of at most {high}")
    return (" " + " and ".join(words)) if words else ""


def describe(tp: Any, meta: tuple = ()) -> str:
    """A declared type as the kind of value a config must hold: ``a whole number of at least 1``,
    ``a list of 3 numbers``, ``'mirror' or 'flat'``, ``a mapping with `root```."""
    tp, meta = _unwrap(tp, meta)
    members = _members(tp)
    if members is not None:
        d = _discriminator(meta)
        if isinstance(d, str):
            return f"a mapping with `{d}`"
        if d is not None:  # told apart by a function: by the key of a one-key mapping
            return f"a mapping with one key, one of {', '.join(_tags(members, d))}"
        return _either([describe(m) for m in members])
    if get_origin(tp) is Literal:
        return _either([show(v) for v in get_args(tp)])
    if tp is bool:
        return "true or false"
    if tp is int:
        return "a whole number" + _bounds(meta, whole=True)
    if tp is float:
        return "a number" + _bounds(meta, whole=False)
    if tp is str:
        pattern = next((m.pattern for m in meta if getattr(m, "pattern", None)), None)
        return "a string" + (f" matching {pattern}" if pattern else "")
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        return "a path"
    if _is_model(tp):
        required = [f"`{name}`" for name, f in tp.model_fields.items() if f.is_required()]
        return "a mapping" + (f" with {' and '.join(required)}" if required else "")
    n = _fixed_length(tp)
    args = _sequence_args(tp)
    if n is not None:
        kinds = {_plural(a) for a in args}
        return f"a list of {n} {kinds.pop() if len(kinds) == 1 else 'values'}"
    if args is not None:
        return f"a list of {_plural(args[0])}"
    if (get_origin(tp) or tp) is dict:
        return "a mapping"
    return "a value"


def _either(words: list[str]) -> str:
    if len(words) <= 2:
        return " or ".join(words)
    return "one of " + ", ".join(words)


def _plural(tp: Any) -> str:
    tp, _ = _unwrap(tp)
    if tp in (int, float):
        return "numbers"
    if tp is str:
        return "strings"
    if tp is bool:
        return "yes/no values"
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        return "paths"
    if _is_model(tp):
        return "mappings"
    if _sequence_args(tp) is not None:
        return "lists"
    if get_origin(tp) is Literal:
        return "values from " + ", ".join(show(v) for v in get_args(tp))
    return "values"


# ------------------------------------------------------------------------------ locations


class _Place:
    """Where an error's location points in the declared types.

    ``keys``: the key path as written in the config (ints for list items);
    ``tp``/``meta``: the declared type there (None beyond what is declared);
    ``union``: for a union of several kinds (no discriminator), how many items of the
    location lead to it (pydantic tries each member and names it in the location);
    ``inside``: the error is within a member that took the value's kind (a list for the
    member that is a list), not a refusal of the value's kind.
    """

    def __init__(self, model: type, loc: tuple):
        self.keys: list = []
        self.union: int | None = None
        self.inside = False
        tp, meta = model, ()
        i = 0
        while i < len(loc):
            item = loc[i]
            tp, meta = _unwrap(tp, meta)
            members = _members(tp)
            if members is not None:
                d = _discriminator(meta)
                if d is not None:
                    tp, meta = _member(members, d, item), ()  # the tag picks a member; it is not a key
                elif self.union is None and i + 1 < len(loc) and _labelled(members, item) is not None:
                    self.union, self.inside = i, True
                    tp, meta = _labelled(members, item), ()  # the member's name is not a key either
                else:
                    self.union = i if self.union is None else self.union
                    break
                i += 1
                continue
            self.keys.append(item)
            child = getattr(tp, "field_for", None) if _is_model(tp) else None
            if _is_model(tp) and item in tp.model_fields:
                field = tp.model_fields[item]
                tp, meta = field.annotation, tuple(_field_meta(field))
            elif child is not None and child(item) is not None:  # a model whose fields come from a registry
                field = child(item)
                tp, meta = field.annotation, tuple(_field_meta(field))
            elif isinstance(item, int) and _sequence_args(tp) is not None:
                tp, meta = _item(tp, item), ()
            elif (get_origin(tp) or tp) is dict and len(get_args(tp)) == 2:
                tp, meta = get_args(tp)[1], ()
            else:
                tp, meta = None, ()
            i += 1
        self.tp, self.meta = _unwrap(tp, meta) if tp is not None else (None, ())

    def key(self, prefix: str = "", extra: Sequence = ()) -> str:
        return key_path([*([prefix] if prefix else []), *self.keys, *extra])


def _labelled(members: list, label: Any) -> Any:
    """The member of a union that pydantic names ``label`` in a location, if it can be told."""
    for m in members:
        if _is_model(_unwrap(m)[0]) and label == _unwrap(m)[0].__name__:
            return m
    if isinstance(label, str) and label.startswith(("tuple[", "list[", "set[", "frozenset[")):
        lists = [m for m in members if _sequence_args(_unwrap(m)[0]) is not None]
        return lists[0] if len(lists) == 1 else None
    return None


def key_path(parts: Sequence) -> str:
    """``["convert", "steps", 3, "shape"]`` -> ``convert.steps[3].shape``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _lookup(data: Any, keys: Sequence) -> Any:
    for k in keys:
        try:
            data = data[k]
        except (KeyError, IndexError, TypeError):
            return None
    return data


# ------------------------------------------------------------------------------ translation


_VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error",
                 "string_pattern_mismatch", "int_from_float", "finite_number", "multiple_of", "enum"}


def problems(exc: ValidationError, model: type, data: Any = None, prefix: str = "") -> list[tuple[str, str]]:
    """Every problem of a failed validation of ``model`` as ``(key path, message)``, in order.

    Parameters
    ----------
    exc : pydantic.ValidationError
        From ``model.model_validate(data)``.
    model : type
        The model validated (a :class:`ConfigModel`); its declared types give the key
        paths and what each key expects.
    data : object, optional
        What was validated, to show the value of a key that failed as a whole.
    prefix : str
        Key path of ``model`` in the config (``convert``).

    Returns
    -------
    list of (str, str)
        Without repeats; all errors pydantic reports for one union (one per member
        tried) are one problem, at the union's key.
    """
    errors = [(err, tuple(err["loc"]), _Place(model, tuple(err["loc"]))) for err in exc.errors()]
    # a union whose value one member took by kind: that member's problems are the problems
    matched = {loc[:place.union] for _, loc, place in errors if place.inside}
    out: list[tuple[str, str]] = []
    for err, loc, place in errors:
        if place.union is None or place.inside:
            out.append(_problem(err, model, loc, place, prefix))
        elif loc[:place.union] not in matched:
            value = next((e["input"] for e, other, _ in errors if other[:place.union] == loc[:place.union]
                          and len(other) == place.union + 1), _lookup(data, place.keys))
            union = _Place(model, loc[:place.union])
            out.append((place.key(prefix), f"expected {describe(union.tp, union.meta)}, found {found(value)}"))
    return list(dict.fromkeys(out))


def _problem(err: dict, model: type, loc: tuple, place: _Place, prefix: str) -> tuple[str, str]:
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        holder = _Place(model, loc[:-1]).tp
        known = list(holder.model_fields) if _is_model(holder) else []
        hint = did_you_mean(loc[-1], known)
        tip = hint or (f"; known keys: {', '.join(sorted(known))}" if known else "")
        return place.key(prefix), f"unknown key '{loc[-1]}'{tip}"
    if kind in ("missing", "too_long", "too_short") and loc:
        # a list of the wrong length: one problem at the list, not one per missing item
        whole = _Place(model, loc[:-1]) if kind == "missing" and isinstance(loc[-1], int) else place
        n = _fixed_length(whole.tp)
        if n is not None:
            size = ctx.get("actual_length", len(value) if hasattr(value, "__len__") else None)
            return whole.key(prefix), f"expected {describe(whole.tp, whole.meta)}, found {size}"
        if kind == "missing":
            return place.key(prefix), "required key is missing"
        if place.tp is not None:
            bound = "at least {min_length}" if kind == "too_short" else "at most {max_length}"
            return place.key(prefix), (f"expected {describe(place.tp, place.meta)} with {bound.format(**ctx)} "
                                       f"item(s), found {ctx.get('actual_length')}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _tag_problem(kind, value, ctx, place, prefix)
    if place.tp is not None and (kind in _VALUE_ERRORS or kind.endswith(("_type", "_parsing"))):
        what = describe(place.tp, place.meta)
        shown = _shown(value) if kind in _VALUE_ERRORS else found(value)
        hint = did_you_mean(value, [str(v) for v in get_args(place.tp)]) \
            if kind == "literal_error" and isinstance(value, str) else ""
        return place.key(prefix), f"expected {what}, found {shown}{hint}"
    msg = err["msg"]
    for head in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(head)
    # a problem of a whole section names its keys: the section itself is not worth showing
    quiet = "found" in msg or "did you mean" in msg or isinstance(value, dict)
    return place.key(prefix), msg if quiet else f"{msg}; found {_shown(value)}"


def _tag_problem(kind: str, value: Any, ctx: dict, place: _Place, prefix: str) -> tuple[str, str]:
    members = _members(place.tp) or []
    d = _discriminator(place.meta)
    tags = _tags(members, d)
    choices = ", ".join(tags)
    extra = [d] if isinstance(d, str) else []  # `convert.to`: the key that names the member
    if kind == "union_tag_not_found":
        if isinstance(d, str):
            return place.key(prefix, extra), f"required key is missing; expected one of {choices}"
        return place.key(prefix), f"expected {describe(place.tp, place.meta)}, found {found(value)}"
    tag = value.get(d) if isinstance(d, str) and isinstance(value, dict) else ctx.get("tag")
    hint = did_you_mean(tag, tags) if isinstance(tag, str) else ""
    return place.key(prefix, extra), f"expected one of {choices}, found {_shown(tag)}{hint}"


def config_error(found_problems: list[tuple[str, str]], where: str | None = None) -> ConfigError:
    """The :class:`ConfigError` listing ``found_problems``.

    With ``where`` (a config file): ``N problem(s) in the config:`` and one line per
    problem. Without (options given in code): ``where`` is the first problem's key.
    """
    if where is not None:
        lines = "\n".join(f"  {k}: {m}" if k else f"  {m}" for k, m in found_problems)
        return ConfigError(where, f"{len(found_problems)} problem(s) in the config:\n{lines}", found_problems)
    (key, first), rest = found_problems[0], found_problems[1:]
    message = "; ".join([first, *(f"{k}: {m}" if k else m for k, m in rest)])
    return ConfigError(key, message, found_problems)


def validated(model: type, data: Any, *, where: str | None = None, prefix: str = "", context: dict | None = None):
    """``model.model_validate(data)``, every problem reported at once as one :class:`ConfigError`.

    Parameters
    ----------
    model : type
        A :class:`ConfigModel`.
    data : object
        The mapping to validate.
    where : str, optional
        The config file, named by the error (see :func:`config_error`).
    prefix : str
        Key path of ``model`` in the config, put before every key (``convert``).
    context : dict, optional
        Validation context (``base``: the folder relative paths resolve against).

    Raises
    ------
    ConfigError
        If ``data`` is invalid; ``errors`` lists ``(key path, message)`` (:func:`problems`).
    """
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise config_error(problems(exc, model, data, prefix), where) from exc
