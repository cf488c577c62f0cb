"""The task-log messages as models: the bytes they put on the wire, and what they refuse."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vespid.shared.errors import ProtocolError
from vespid.shared.logwire import (
    LogChunk,
    LogGet,
    LogResponse,
    decode_log_message,
    validated,
    whole_characters,
)
from vespid.shared.protocol import encode


@pytest.mark.parametrize(("chunk", "wire"), [
    (LogChunk.carrying("t", 2, "n1", 0, b"hi\n"),
     '{"command":"log-chunk","task":"t","attempt":2,"node":"n1","offset":0,"data":"hi\\n"}'),
    (LogChunk.carrying("t", 1, "n1", 3, b"\xe2\x82"),  # a cut inside a character
     '{"command":"log-chunk","task":"t","attempt":1,"node":"n1","offset":3,'
     '"data_base64":"4oI="}'),
    (LogChunk.end("t", 1, "n1", 5),
     '{"command":"log-chunk","task":"t","attempt":1,"node":"n1","offset":5,"data":"",'
     '"eof":true}'),
])
def test_a_chunk_puts_the_same_bytes_on_the_wire_as_before_and_reads_back_equal(
        chunk: LogChunk, wire: str) -> None:
    body = encode(chunk)

    assert body == wire.encode()
    assert decode_log_message(body) == chunk


def test_a_chunk_carries_its_bytes_as_text_or_base64() -> None:
    for data in (b"plain\n", b"\xff\xfe binary", "é".encode()[:1], b""):
        assert LogChunk.carrying("t", 1, "n", 0, data).content() == data


def test_a_log_get_and_its_response_read_back_equal() -> None:
    get = LogGet(command="log-get", task="t", attempt=None, offset=0)
    response = LogResponse(task="t", attempt=2, attempts=[1, 2], node="n1", offset=0,
                           data="two\n", size=4, known=True, complete=False)

    assert encode(get) == b'{"command":"log-get","task":"t","attempt":null,"offset":0}'
    assert decode_log_message(encode(get)) == get
    assert validated(LogResponse, json.loads(encode(response))) == response


def test_what_an_older_or_newer_agent_sends_is_still_read() -> None:
    older = decode_log_message(b'{"command":"log-chunk","task":"t","offset":0,"data":"x"}')
    newer = decode_log_message(b'{"command":"log-chunk","task":"t","attempt":3,"offset":0,'
                               b'"data":"x","compressed":false}')

    assert isinstance(older, LogChunk) and older.attempt == 1  # before attempts: the first
    assert isinstance(newer, LogChunk) and newer.content() == b"x"


@pytest.mark.parametrize(("fields", "reason"), [
    ({"attempt": 0, "offset": 0}, "attempt: Input should be greater than 0"),
    ({"attempt": "1", "offset": 0}, "attempt: Input should be a valid integer"),
    ({"attempt": True, "offset": 0}, "attempt: Input should be a valid integer"),
    ({"offset": -1}, "offset: Input should be greater than or equal to 0"),
    ({"offset": "x"}, "offset: Input should be a valid integer"),
    ({"data": "a"}, "offset: Field required"),
    ({"offset": 0, "data_base64": "%%%"}, "data_base64: not base64"),
    ({"offset": 0, "task": "../etc"}, "task: String should match pattern"),
    ({"offset": 0, "task": ".."}, "task: '..' names a folder, not a task"),
])
def test_a_bad_chunk_is_refused_saying_which_field_is_wrong(
        fields: dict[str, Any], reason: str) -> None:
    body = json.dumps({"command": "log-chunk", "task": "t", **fields}).encode()

    with pytest.raises(ProtocolError) as refused:
        decode_log_message(body)

    assert refused.value.code == "invalid_message"
    assert refused.value.message.startswith(f"log-chunk: {reason}"), refused.value.message


@pytest.mark.parametrize(("body", "code"), [
    (b"not json", "invalid_json"),
    (b'{"command": "log-put", "task": "t"}', "unknown_command"),
    (b'{"task": "t"}', "unknown_command"),
])
def test_what_is_not_a_log_message_is_refused(body: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_log_message(body)

    assert refused.value.code == code


@pytest.mark.parametrize("cut", range(0, 12))
def test_text_read_in_parts_never_splits_a_character(cut: int) -> None:
    whole = "a\u2018b\u2019\u20ac\U0001d11ez"  # quotes as gcc prints them, euro, a clef
    text = whole.encode()  # 1-, 3- and 4-byte characters
    first = whole_characters(text[:cut])

    assert text[:cut].startswith(first) and len(text[:cut]) - len(first) <= 3
    assert (first + text[len(first):]).decode() == whole
    first.decode()  # whole characters only: never raises


def test_following_a_log_prints_a_character_split_between_two_chunks_whole(
        capsys: pytest.CaptureFixture[str]) -> None:
    import base64
    import codecs

    from vespid.client.logs import _print_new

    data = "x\u2019y".encode()  # the quote is 3 bytes: cut after its first
    parts = [data[:2], data[2:]]
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0
    for part in parts:
        chunk = LogChunk(command="log-chunk", task="t", offset=offset,
                         data_base64=base64.b64encode(part).decode())
        offset = _print_new(chunk, offset, text)

    assert capsys.readouterr().out == "x\u2019y"
    assert offset == len(data)
