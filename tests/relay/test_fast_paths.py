"""The hot path's shortcuts give exactly what the slow paths they bypass give."""

from __future__ import annotations

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st
from smtprelay.esmtp import EsmtpParameters
from smtprelay.spool import Shard, is_queue_id


class _Limits:
    def __init__(self, limit: int) -> None:
        self.local_part_limit = limit


class _Parser(EsmtpParameters):
    def __init__(self, limit: int) -> None:  # no session: only the parser is used
        self.local_part_limit = limit


_PIECES = st.sampled_from(
    [
        *("<", ">", "@", ".", " ", "\t", "(", ")", '"', "a", "b", "Z", "0", "-", "_", "+", "é"),
        *("[1.2.3.4]", "SIZE=10", "BODY=8BITMIME", ":", ",", "\\", "\r\n", "<>", "x.y"),
    ]
)


def _aiosmtpd(arg: str, limit: int) -> tuple[str | None, str | None]:
    """aiosmtpd's own parser; where the standard library's parser crashes on the input,
    the relay answers it as a syntax error (None, None)."""
    try:
        return SMTP._getaddr(_Limits(limit), arg)  # type: ignore[arg-type]
    except IndexError:
        return None, None


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=14).map("".join), st.sampled_from([0, 3, 64]))
def test_address_parser_agrees_with_aiosmtpd(arg: str, limit: int) -> None:
    assert _Parser(limit)._getaddr(arg) == _aiosmtpd(arg, limit)


def test_address_parser_common_shapes() -> None:
    for arg in [
        "<user@example.com>",
        "<first.last+tag@mail.example.org> SIZE=2048 BODY=8BITMIME",
        "<a@b> (comment) SIZE=1",
        "<averyveryverylonglocalpart@example.com>",
        '<"quoted"@example.com>',
        "<a..b@example.com>",
        "<a@example.com.>",
        "<>",
    ]:
        for limit in (0, 10, 64):
            assert _Parser(limit)._getaddr(arg) == _aiosmtpd(arg, limit), (arg, limit)


def test_queue_ids_belong_to_their_shard_and_do_not_repeat() -> None:
    """A worker's new ids are its own (it delivers what it accepts), well formed, distinct,
    and spread over the last 16 bits rather than stuck on a few values."""
    for count in (1, 2, 3, 7, 64):
        for index in range(count):
            shard = Shard(index, count)
            ids = [shard.new_id(1_700_000_000.0) for _ in range(2000)]
            assert all(shard.owns(queue_id) and is_queue_id(queue_id) for queue_id in ids)
            assert len(set(ids)) == len(ids)
            assert len({queue_id[-4:] for queue_id in ids}) > 1000 // count
