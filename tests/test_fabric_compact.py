"""The compact call encoding and Ring.dispatch (fabric/_ring.c): values keep their
exact types, malformed bytes raise ValueError, compact and pickled messages keep
their order on a link, and a reply resumes its task eagerly without losing
contexts, callbacks or exceptions."""

from __future__ import annotations

import math
import os
import random

import compact_functions as cf
import pytest
from shardio.fabric._ring import decode_value, encode_call, encode_result

import shardio


class Number(int):
    pass


PLAIN = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63 - 1,
    -(2**63),
    0.0,
    -0.0,
    1.5,
    math.inf,
    "",
    "ascii",
    "snowman \u2603 and \U0001f600",
    b"",
    b"\x00\xff" * 100,
    (),
    (1,),
    (1, (2, (3, "x"))),
    ((), ((),)),
    tuple(range(100)),
    "x" * 100_000,
]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_values_round_trip_with_their_exact_type(value):
    message = encode_result(7, value)
    assert message is not None
    assert message[0] == shardio.fabric.messages.RESULT
    decoded = decode_value(message, 9)
    assert decoded == value and type(decoded) is type(value)
    if isinstance(value, float):
        assert math.copysign(1, decoded) == math.copysign(1, value)


def test_nan_keeps_its_bits():
    decoded = decode_value(encode_result(1, math.nan), 9)
    assert math.isnan(decoded)


@pytest.mark.parametrize(
    "value",
    [
        2**63,
        -(2**63) - 1,
        Number(3),
        "\udc80",
        {"a": 1},
        bytearray(b"x"),
        {1},
        object(),
        [1],
        (1, [2]),
    ],
    ids=[
        "big int",
        "small int",
        "int subclass",
        "lone surrogate",
        "dict",
        "bytearray",
        "set",
        "object",
        "list",
        "list in a tuple",
    ],
)
def test_values_outside_the_encoding_are_left_to_pickle(value):
    assert encode_result(1, value) is None
    assert encode_call(1, 1, (value,)) is None


def test_nesting_beyond_the_limit_is_left_to_pickle():
    value: tuple = ()
    for _ in range(31):  # 32 tuples deep, the limit
        value = (value,)
    assert decode_value(encode_result(1, value), 9) == value
    assert encode_result(1, value) is not None
    assert encode_result(1, (value,)) is None
    looped: list = []
    looped.append(looped)
    assert encode_result(1, looped) is None


def test_malformed_values_raise_value_error_never_crash():
    rng = random.Random(12)
    samples = [encode_call(5, 3, (v, (v, (v,)))) for v in PLAIN]
    failures = 0
    for _ in range(20_000):
        message = bytearray(rng.choice(samples)[13:])
        for _ in range(rng.randint(1, 4)):
            operation = rng.randrange(3)
            if operation == 0 and message:
                message[rng.randrange(len(message))] = rng.randrange(256)
            elif operation == 1:
                del message[rng.randrange(len(message) + 1) :]
            else:
                message[rng.randrange(len(message) + 1) : 0] = os.urandom(rng.randint(1, 9))
        try:
            decode_value(bytes(message))
        except ValueError:
            failures += 1
    assert failures > 1000  # most mutations are caught, by the checks, not by luck
    with pytest.raises(ValueError, match="runs past the end"):
        decode_value(b"s\xff\xff\xff\x7fabc")
    with pytest.raises(ValueError, match="trailing"):
        decode_value(b"NN")
    with pytest.raises(ValueError, match="offset"):
        decode_value(b"N", 2)


@pytest.fixture(scope="module")
def pair():
    with shardio.ShardGroup(2, backend="process", idle_poll_us=200) as group:
        yield group


async def _cross(values):
    return await shardio.submit_to(1, cf.echo, *values)


def test_values_cross_shards_with_their_exact_types(pair):
    values = [True, 1, 1.0, "1", b"1", (1,), [1], None, Number(5), 2**70, {"k": (1, 2)}]
    returned, names = pair.submit(0, _cross, values).result(timeout=30)
    assert list(returned) == values
    assert [type(v) for v in returned] == [type(v) for v in values]
    assert list(names) == [type(v).__name__ for v in values]


def test_one_list_passed_twice_stays_one_list(pair):
    """Lists go pickled: two references to one list arrive as one list."""
    assert pair.submit(0, cf.shared_list, 1).result(timeout=30) is True


def test_compact_and_pickled_calls_keep_their_order_on_a_link(pair):
    """Compact calls (decoded in C) interleaved with pickled ones (handled in Python):
    every call arrives once, in order, and gets its own result.  50,000 calls each way here;
    SHARDIO_COMPACT_STREAM=1000000 for the long run."""
    count = int(os.environ.get("SHARDIO_COMPACT_STREAM", "50000"))
    futures = [
        pair.submit(0, cf.mixed_stream, 1, count, 512),
        pair.submit(1, cf.mixed_stream, 0, count, 512),
    ]
    assert [f.result(timeout=600) for f in futures] == [count, count]
    for receiver, source in ((1, 0), (0, 1)):
        seen, violations = pair.submit(receiver, cf.stream_report, source).result(timeout=30)
        assert violations == []
        assert seen == count


def test_eagerly_resumed_tasks_keep_their_context(pair):
    before = pair.submit(0, cf.eager_wakeups, 1).result(timeout=30)
    tags = pair.submit(0, cf.context_survives, 1, 300).result(timeout=60)
    assert tags == [f"task-{n}" for n in range(8)]
    # The replies did resume their tasks eagerly (the path under test ran).
    assert pair.submit(0, cf.eager_wakeups, 1).result(timeout=30) - before > 100


def test_every_done_callback_of_a_reply_runs_in_order(pair):
    assert pair.submit(0, cf.every_done_callback_runs, 1).result(timeout=30) == ["first", "second"]


def test_an_exception_in_a_done_callback_reaches_the_loop(pair):
    reported = pair.submit(0, cf.failing_callback_is_reported, 1).result(timeout=30)
    assert reported == ["RuntimeError('boom in a done callback')"]


def test_replies_to_cancelled_calls_are_dropped(pair):
    assert pair.submit(0, cf.cancelled_calls_drop_their_reply, 1, 500).result(timeout=30) == 0


def test_calls_served_inside_dispatch_answer_as_the_python_path_would(pair):
    """Another shard's compact calls run inside Ring.dispatch (C); a result, a coroutine's
    result, a result that must be pickled and an exception all come back as they would
    from the Python path, and the serve path did run them."""
    before = pair.submit(1, cf.served_calls, 0).result(timeout=30)
    outcomes = pair.submit(0, cf.served_outcomes, 1).result(timeout=30)
    assert outcomes == [((7, "x"), ("int", "str")), 42, {"value": (1, 2)},
                        "LookupError: no such key"]
    assert pair.submit(1, cf.served_calls, 0).result(timeout=30) - before >= 4


def test_requests_run_counts_the_calls_served_inside_dispatch(pair):
    before = pair.submit(1, cf.requests_run).result(timeout=30)
    served = pair.submit(1, cf.served_calls, 0).result(timeout=30)
    pair.submit(0, cf.cancelled_calls_drop_their_reply, 1, 300).result(timeout=30)
    assert pair.submit(1, cf.served_calls, 0).result(timeout=30) - served >= 300
    # 600 calls from shard 0, and the owner's three probes after the first one.
    assert pair.submit(1, cf.requests_run).result(timeout=30) - before == 600 + 3


def test_the_loop_gets_its_call_soon_back_after_each_batch(pair):
    assert pair.submit(0, cf.call_soon_after_batches, 1, 20).result(timeout=60) == [False] * 20
