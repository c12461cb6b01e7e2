"""Plain values over a text channel: what a sandboxed function may return, and nothing else.

Only values whose type is exactly one of None, bool, int, float, complex, str, bytes, list, tuple, dict, set or
frozenset (recursively) encode; a subclass or any other object (say, one whose ``__eq__`` always says True) is
refused. Decoding builds fresh built-in values from JSON, so whatever the other side sends, the receiver compares
plain values. Sent as source into the sandbox by the code verifier, and imported by the tests.
"""

import json
import math



class NotPlain(TypeError):
    pass


def encode(value, depth=0):
    """A JSON-ready form of ``value``; :class:`NotPlain` for anything but plain built-in values."""
    if depth > 100:
        raise NotPlain("value nested more than 100 levels deep")
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind in (tuple, set, frozenset):
        items = list(value) if kind is tuple else sorted(value, key=repr)
        return {kind.__name__: [encode(v, depth + 1) for v in items]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [encode(value.real), encode(value.imag)]}
    raise NotPlain(f"{kind.__module__}.{kind.__qualname__} is not a plain value")


def decode(data):
    """The plain value that :func:`encode` produced ``data`` from; ValueError on anything else."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v) for v in data]
    if type(data) is dict and len(data) == 1:
        (tag, inner), = data.items()
        if tag == "float" and inner in ("inf", "-inf", "nan"):
            return float(inner)
        if tag == "bytes" and type(inner) is str:
            return bytes.fromhex(inner)
        if tag == "complex" and type(inner) is list and len(inner) == 2:
            return complex(float(decode(inner[0])), float(decode(inner[1])))
        if tag in ("tuple", "set", "frozenset") and type(inner) is list:
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](decode(v) for v in inner)
        if tag == "dict" and type(inner) is list and all(type(p) is list and len(p) == 2 for p in inner):
            return {decode(k): decode(v) for k, v in inner}
    raise ValueError(f"not an encoded plain value: {json.dumps(data)[:80]}")
