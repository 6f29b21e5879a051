"""A config's wrong key or type for one of our modules, named with what is allowed.

Without a check, a misspelt key fails as Python's "unexpected keyword argument" (which lists nothing)
and a wrong type fails somewhere inside the constructor (``'<=' not supported between ... 'str'``), or
not at all (``norm_eval='no'`` is true). :func:`check_arguments` compares the keyword arguments with the
constructor's signature and annotations before it runs, so the checks follow the signature as it
changes.
"""
import collections.abc
import difflib
import functools
import inspect
import types
import typing


class ArgumentError(TypeError, ValueError):
    """A bad constructor argument from a config: a ``TypeError`` like Python's own, and a
    ``ValueError`` so that the tools report it in one line as a user's mistake."""


def check_arguments(cls: type) -> type:
    """Class decorator: check the keyword arguments of ``cls`` (and of subclasses that keep its
    constructor) against the constructor's signature: every name must be a parameter, and every value
    of a parameter annotated with a plain type (``int``, ``float``, ``bool``, ``str``, ``dict``, or an
    ``Optional`` / ``Union`` of them) must be of that type. Container annotations (``Sequence[int]``,
    ``List[dict]``) are left to the constructor, which may accept more (an int for ``out_indices``)."""
    init = cls.__init__
    signature = inspect.signature(init)
    hints = typing.get_type_hints(init)
    parameters = [p for name, p in signature.parameters.items() if name != 'self']
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in parameters)

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        owner = type(self).__name__
        if not open_ended:
            for key in kwargs:
                if key not in names:
                    close = difflib.get_close_matches(key, names, n=1)
                    hint = f' (did you mean {close[0]!r}?)' if close else ''
                    raise ArgumentError(f'{owner}: unknown argument {key!r}{hint}; allowed: '
                                        f'{", ".join(names)}')
        for key, value in [*zip(names, args), *kwargs.items()]:
            expected = _plain_types(hints.get(key))
            if expected is not None and not any(_is(value, t) for t in expected):
                raise ArgumentError(
                    f'{owner}: {key} must be {" or ".join(_name(t) for t in expected)}, got '
                    f'{type(value).__name__} {value!r}')
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls


_PLAIN = (int, float, bool, str, dict, type(None))


def _plain_types(hint):
    """The plain types an annotation allows, or None if it is not made of plain types only."""
    if hint in _PLAIN:
        return [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [_plain_types(arg) for arg in typing.get_args(hint)]
        if all(m is not None for m in members):
            return [t for m in members for t in m]
    return None


def _is(value, expected: type) -> bool:
    if expected is float:  # an int is a float to a config, a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is dict:
        return isinstance(value, collections.abc.Mapping)
    return isinstance(value, expected)


def _name(expected: type) -> str:
    return 'None' if expected is type(None) else expected.__name__
