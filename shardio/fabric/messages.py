"""What crosses the fabric: a 9-byte header (kind, request id) and a pickle.

The header stays outside the pickle so that a body which cannot be
unpickled on the other side (a function the shard cannot import, an
exception class with an unusual constructor) still fails the right call
instead of leaving it waiting forever.

A call that introduces an interned function (``REQUEST_WITH_FUNCTION``)
carries the function's number (4 bytes) and two pickles back to back: the
function, then ``(args, kwargs)``.  The receiver learns the function before
it tries the arguments, so arguments that fail to unpickle fail only their own
call, never the function's later calls on the link.

The common call needs no pickle at all: a call of an interned function
whose arguments are plain values (None, bool, int, float, str, bytes, and
tuples of them; see ``_ring.c``) is a ``CALL`` (header, the 4-byte
function number, the arguments in the compact encoding), and a plain result
returned to a shard is a ``RESULT``.  ``Ring.dispatch`` decodes both in C;
anything else is pickled as before.  The owner and added endpoints read
replies with ``Ring.dispatch`` too (shardio/external.py), so every peer gets
compact results.
"""

from __future__ import annotations

import io
import pickle
import struct
import traceback
import types
from typing import Any

from ..errors import CannotCrossError, MessageTooLarge, RemoteError
from ._ring import (
    KIND_CALL,
    KIND_RESULT,
    decode_value,
    encode_call as _encode_call,
    encode_result as _encode_compact_result,
)

REQUEST = 1
REPLY_OK = 2
REPLY_ERROR = 3
REQUEST_WITH_FUNCTION = 4
CALL = KIND_CALL
"""An interned function's call with compactly encoded arguments."""
RESULT = KIND_RESULT
"""A result in the compact encoding (to shards only)."""
REQUEST_IN_GROUP = 7
"""A request made in a scheduling group (any request kind inside, see GROUP)."""
HEADER = struct.Struct("<BQ")
#: After a REQUEST_IN_GROUP header: the group's shares, its name's length, the
#: inner request's kind; then the name and the inner request's body.
GROUP = struct.Struct("<dBB")
PROTOCOL = pickle.HIGHEST_PROTOCOL

NUMBER = struct.Struct("<I")

_pack_header = HEADER.pack
_pack_number = NUMBER.pack
_dumps = pickle.dumps
_INTERNABLE = frozenset({types.FunctionType, types.BuiltinFunctionType})


def encode_request(request_id: int, func: Any, args: tuple, kwargs: dict | None,
                   destination: str, interned: dict, max_bytes: int) -> bytes:
    """Encode a call; ``interned`` is the sending link's function table.

    Pickling a function by reference costs microseconds on both sides (a
    module lookup and an identity check), so each link interns plain
    functions: the first call on the link carries the function and a number
    for it (in a pickle of its own, see the module's docstring), later calls
    carry only the number.  Rings are ordered, so the receiver always learns
    the number before its first use.
    """
    number = interned.get(func) if type(func) in _INTERNABLE else None
    if number is not None and not kwargs:
        payload = _encode_call(request_id, number, args)
        if payload is not None:
            if len(payload) > max_bytes:
                _check_size(payload, max_bytes, destination)
            return payload
    try:
        if number is not None:
            payload = _pack_header(REQUEST, request_id) + _dumps(
                (number, None, args, kwargs), PROTOCOL)
        elif type(func) in _INTERNABLE:
            number = len(interned) + 1
            payload = (_pack_header(REQUEST_WITH_FUNCTION, request_id) + _pack_number(number)
                       + _dumps(func, PROTOCOL) + _dumps((args, kwargs), PROTOCOL))
            _check_size(payload, max_bytes, destination)
            interned[func] = number
            return payload
        else:
            payload = _pack_header(REQUEST, request_id) + _dumps((0, func, args, kwargs),
                                                                 PROTOCOL)
    except MessageTooLarge:
        raise
    except Exception as error:
        raise _explain_unpicklable(func, args, kwargs, destination, error) from error
    _check_size(payload, max_bytes, destination)
    return payload


def _check_size(payload: bytes, max_bytes: int, destination: str) -> None:
    if len(payload) > max_bytes:
        raise MessageTooLarge(
            f"a call to {destination} pickles to {len(payload)} bytes, more than "
            f"max_message_bytes={max_bytes}; pass large data through a file or shared "
            "storage, or raise max_message_bytes")


class _Unlearned:
    """A table entry for a function whose introduction could not be unpickled."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def decode_request(kind: int, body, table: dict) -> tuple:
    """The receiving side of :func:`encode_request`: (func, args, kwargs).

    ``table`` is the receiving link's function table; it learns a function
    from a ``REQUEST_WITH_FUNCTION`` message even when its arguments fail.
    """
    if kind == CALL:
        (number,) = NUMBER.unpack_from(body)
        func = _learned(table, number)
        return func, decode_value(body, NUMBER.size), None
    if kind == REQUEST_WITH_FUNCTION:
        (number,) = NUMBER.unpack_from(body)
        stream = io.BytesIO(body)
        stream.seek(NUMBER.size)
        try:
            func = pickle.Unpickler(stream).load()
        except Exception as error:
            table[number] = _Unlearned(repr(error))
            raise
        table[number] = func
        args, kwargs = pickle.Unpickler(stream).load()
        return func, args, kwargs
    number, func, args, kwargs = pickle.loads(body)
    if number:
        func = _learned(table, number)
    return func, args, kwargs


def encode_in_group(payload: bytes, name: bytes, shares: float) -> bytes:
    """A request made in a scheduling group: the receiver runs it in the same-named group."""
    kind, request_id = HEADER.unpack_from(payload)
    return (_pack_header(REQUEST_IN_GROUP, request_id) + GROUP.pack(shares, len(name), kind)
            + name + payload[HEADER.size:])


def decode_in_group(body) -> tuple[str, float, int, Any]:
    """The receiving side of :func:`encode_in_group`: (name, shares, kind, inner body)."""
    shares, length, kind = GROUP.unpack_from(body)
    start = GROUP.size
    return bytes(body[start:start + length]).decode(), shares, kind, body[start + length:]


def _learned(table: dict, number: int) -> Any:
    func = table.get(number)
    if func is None or type(func) is _Unlearned:
        reason = func.reason if func is not None else "it never arrived"
        raise LookupError(f"function #{number} is unknown here: the call that introduced "
                          f"it could not be unpickled ({reason})")
    return func


def encode_result(request_id: int, value: Any, compact: bool = False) -> bytes:
    """A result message; ``compact`` tries the compact encoding first."""
    if compact:
        payload = _encode_compact_result(request_id, value)
        if payload is not None:
            return payload
    return _pack_header(REPLY_OK, request_id) + _dumps(value, PROTOCOL)


def decode_result(kind: int, body) -> Any:
    """The value of a ``REPLY_OK`` or ``RESULT`` message's body."""
    return decode_value(body) if kind == RESULT else pickle.loads(body)


def encode_error(request_id: int, error: BaseException, shard: int | str) -> bytes:
    """Encode an exception with its traceback text; never raises."""
    tb_text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        exc_bytes = _dumps(error, PROTOCOL)
    except Exception:
        exc_bytes = None
    body = (exc_bytes, type(error).__qualname__, str(error), tb_text, shard)
    return _pack_header(REPLY_ERROR, request_id) + _dumps(body, PROTOCOL)


def decode_error(body) -> BaseException:
    """Rebuild a remote exception: same type and message, traceback text attached."""
    exc_bytes, type_name, message, tb_text, shard = pickle.loads(body)
    error: BaseException | None = None
    if exc_bytes is not None:
        try:
            error = pickle.loads(exc_bytes)
        except Exception:
            error = None
    if error is None:
        error = RemoteError(f"{type_name}: {message}", type_name, tb_text)
    error.remote_traceback = tb_text  # type: ignore[attr-defined]
    try:
        error.add_note(f"\nRemote traceback (shard {shard}):\n{tb_text.rstrip()}")
    except Exception:
        pass
    return error


def _explain_unpicklable(func, args, kwargs, destination, error) -> CannotCrossError:
    """Find which piece of a call cannot be pickled and say so."""
    pieces = [("the function", func)]
    pieces += [(f"argument {i}", arg) for i, arg in enumerate(args)]
    pieces += [(f"keyword argument {name!r}", value) for name, value in (kwargs or {}).items()]
    for label, value in pieces:
        try:
            _dumps(value, PROTOCOL)
        except Exception as piece_error:
            return CannotCrossError(
                f"cannot send {label} ({_describe(value)}) to {destination}: it cannot be "
                f"pickled ({type(piece_error).__name__}: {piece_error}). Functions must be "
                "importable module-level names; lambdas, local functions, sockets, locks "
                "and open files cannot cross between shards."
            )
    return CannotCrossError(f"cannot send call to {destination}: {error}")


def _describe(value: Any) -> str:
    name = getattr(value, "__qualname__", None)
    if name is not None:
        return f"{type(value).__name__} {name}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
