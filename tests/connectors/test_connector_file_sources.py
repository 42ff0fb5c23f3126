"""JsonLines and Csv sources on real files: batches, positions, resuming, following."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from support.connectors import Follower, read_to_end, values_of

import connectors
from connectors import Csv, JsonLines
from pipelines.errors import ConnectorError

# -- JsonLines -------------------------------------------------------------------------------


def append_lines(path: Path, count: int, start: int = 0) -> list[bytes]:
    lines = [orjson.dumps({"i": i, "user": f"u{i % 7}"}) for i in range(start, start + count)]
    with path.open("ab") as file:
        file.write(b"".join(line + b"\n" for line in lines))
    return lines


async def test_jsonlines_reads_raw_lines_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = append_lines(path, 2500)
    batches = await read_to_end(JsonLines(path, batch_size=1000))
    assert [len(b.values) for b in batches] == [1000, 1000, 500]
    assert values_of(batches) == lines
    assert all(b.raw for b in batches)
    assert all(b.keys is None and b.timestamps is None for b in batches)
    assert batches[-1].position == path.stat().st_size
    # each position is the offset right after the batch's last line
    for batch in batches:
        assert path.read_bytes()[: batch.position].endswith(batch.values[-1] + b"\n")


async def test_jsonlines_position_after_each_batch_resumes_without_gap_or_duplicate(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.jsonl"
    lines = append_lines(path, 1234)
    batches = await read_to_end(JsonLines(path, batch_size=100))
    for index, batch in enumerate(batches):
        resumed = values_of(await read_to_end(JsonLines(path, batch_size=100), batch.position))
        assert values_of(batches[: index + 1]) + resumed == lines
    assert await read_to_end(JsonLines(path), batches[-1].position) == []


async def test_jsonlines_tiny_chunks_across_line_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connectors.files, "CHUNK_SIZE", 7)  # lines span several reads
    path = tmp_path / "in.jsonl"
    lines = append_lines(path, 300)
    batches = await read_to_end(JsonLines(path, batch_size=32))
    assert values_of(batches) == lines
    assert max(len(b.values) for b in batches) == 32
    middle = batches[4].position
    assert values_of(await read_to_end(JsonLines(path), middle)) == values_of(batches[5:])


async def test_jsonlines_skips_blank_lines_and_strips_crlf(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\n{"a":1}\r\n\r\n  \n{"a":2}\n\n{"a":3}\r\n\n')
    batches = await read_to_end(JsonLines(path, batch_size=2))
    assert values_of(batches) == [b'{"a":1}', b'{"a":2}', b'{"a":3}']
    assert batches[-1].position == path.stat().st_size
    first = batches[0].position
    assert values_of(await read_to_end(JsonLines(path, batch_size=2), first)) == values_of(
        batches[1:]
    )


async def test_jsonlines_passes_malformed_lines_through_raw(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a":1}\n{"a": oops\nnot json at all\n\xff\xfe\n[1,2]\n')
    values = values_of(await read_to_end(JsonLines(path)))
    assert values == [b'{"a":1}', b'{"a": oops', b"not json at all", b"\xff\xfe", b"[1,2]"]


async def test_jsonlines_emits_partial_last_line_at_eof(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}')
    batches = await read_to_end(JsonLines(path))
    assert values_of(batches) == [b'{"a":1}', b'{"a":2}']
    assert batches[-1].position == path.stat().st_size


async def test_jsonlines_drops_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a":1}\n{"a":2}\n')
    batches = await read_to_end(JsonLines(path, batch_size=1))
    assert values_of(batches) == [b'{"a":1}', b'{"a":2}']
    assert batches[0].position == 3 + 8
    assert values_of(await read_to_end(JsonLines(path), batches[0].position)) == [b'{"a":2}']


async def test_jsonlines_keys_from_parsed_values(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"user":"ann"}\nbroken\n{"other":1}\n{"user":"bob"}\n')
    batches = await read_to_end(JsonLines(path, key=lambda value: value["user"]))
    assert batches[0].keys == ["ann", None, None, "bob"]
    assert batches[0].values[1] == b"broken"


async def test_jsonlines_missing_file_raises_connector_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "in.jsonl"
    with pytest.raises(ConnectorError) as caught:
        await read_to_end(JsonLines(path))
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert "follow=True" in message


async def test_jsonlines_directory_raises_connector_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectorError, match="is a directory"):
        await read_to_end(JsonLines(tmp_path))


async def test_jsonlines_position_past_end_raises(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    append_lines(path, 3)
    with pytest.raises(ConnectorError, match="past the end"):
        await read_to_end(JsonLines(path), 10_000)


async def test_jsonlines_bad_position_raises(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    append_lines(path, 3)
    with pytest.raises(ConnectorError, match="byte offset"):
        await read_to_end(JsonLines(path), "12")


async def test_jsonlines_follow_picks_up_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    first = append_lines(path, 5)
    follower = Follower(JsonLines(path, follow=True, poll_interval=0.01, batch_size=3))
    try:
        assert await follower.wait_for(5) == first
        more = append_lines(path, 4, start=5)
        assert await follower.wait_for(9) == first + more
        assert follower.batches[-1].position == path.stat().st_size
    finally:
        await follower.stop()


async def test_jsonlines_follow_waits_for_the_end_of_a_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":')
    follower = Follower(JsonLines(path, follow=True, poll_interval=0.01))
    try:
        assert await follower.wait_for(1) == [b'{"a":1}']
        await asyncio.sleep(0.1)
        assert follower.values == [b'{"a":1}']  # the partial line is held back
        assert follower.batches[-1].position == 8
        with path.open("ab") as file:
            file.write(b'2}\n{"a":3}\n')
        assert await follower.wait_for(3) == [b'{"a":1}', b'{"a":2}', b'{"a":3}']
    finally:
        await follower.stop()


async def test_jsonlines_follow_waits_for_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "later.jsonl"
    follower = Follower(JsonLines(path, follow=True, poll_interval=0.01))
    try:
        await asyncio.sleep(0.05)
        assert follower.values == []
        lines = append_lines(path, 2)
        assert await follower.wait_for(2) == lines
    finally:
        await follower.stop()


async def test_jsonlines_follow_resumes_from_position(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = append_lines(path, 10)
    position = (await read_to_end(JsonLines(path, batch_size=4)))[0].position
    follower = Follower(JsonLines(path, follow=True, poll_interval=0.01), position)
    try:
        assert await follower.wait_for(6) == lines[4:]
    finally:
        await follower.stop()


async def test_jsonlines_follow_detects_truncation(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    append_lines(path, 10)
    follower = Follower(JsonLines(path, follow=True, poll_interval=0.01))
    await follower.wait_for(10)
    path.write_bytes(b"")
    with pytest.raises(ConnectorError, match="truncated"):
        await asyncio.wait_for(follower._task, 5)


# -- Csv -----------------------------------------------------------------------------------


async def test_csv_reads_rows_as_dicts(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("name,n,price\nann,1,2.5\nbob,2,3\n")
    batches = await read_to_end(Csv(path))
    assert values_of(batches) == [
        {"name": "ann", "n": "1", "price": "2.5"},
        {"name": "bob", "n": "2", "price": "3"},
    ]
    assert not batches[0].raw
    assert batches[-1].position == path.stat().st_size


async def test_csv_types_convert_and_keep_bad_cells(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("name,n,price\nann,1,2.5\nbob,x,\n")
    values = values_of(await read_to_end(Csv(path, types={"n": int, "price": float})))
    assert values == [
        {"name": "ann", "n": 1, "price": 2.5},
        {"name": "bob", "n": "x", "price": None},
    ]


async def test_csv_unknown_type_column_raises(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("name,n\nann,1\n")
    with pytest.raises(ConnectorError, match="'count'"):
        await read_to_end(Csv(path, types={"count": int}))


async def test_csv_batches_positions_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    rows = [f"r{i},{i}" for i in range(250)]
    path.write_text("id,n\n" + "\n".join(rows) + "\n")
    batches = await read_to_end(Csv(path, batch_size=100, types={"n": int}))
    assert [len(b.values) for b in batches] == [100, 100, 50]
    expected = [{"id": f"r{i}", "n": i} for i in range(250)]
    assert values_of(batches) == expected
    for index, batch in enumerate(batches):
        resumed = values_of(await read_to_end(Csv(path, types={"n": int}), batch.position))
        assert values_of(batches[: index + 1]) + resumed == expected


async def test_csv_quoted_fields_with_newlines_delimiters_and_quotes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connectors.files, "CHUNK_SIZE", 5)
    path = tmp_path / "in.csv"
    path.write_bytes(
        b'id;text\r\n1;"two\nlines"\r\n2;"semi;colon ""quoted"""\r\n'
        b'\r\n3;"a\r\nb\n\nc"\r\n4;plain\r\n'
    )
    batches = await read_to_end(Csv(path, delimiter=";", batch_size=2))
    assert values_of(batches) == [
        {"id": "1", "text": "two\nlines"},
        {"id": "2", "text": 'semi;colon "quoted"'},
        {"id": "3", "text": "a\r\nb\n\nc"},
        {"id": "4", "text": "plain"},
    ]
    first = batches[0].position
    assert values_of(await read_to_end(Csv(path, delimiter=";"), first)) == values_of(batches[1:])


async def test_csv_short_and_long_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,b,c\n1,2\n1,2,3,4,5\n")
    assert values_of(await read_to_end(Csv(path))) == [
        {"a": "1", "b": "2", "c": None},
        {"a": "1", "b": "2", "c": "3", "_extra": ["4", "5"]},
    ]


async def test_csv_partial_last_row_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"\xef\xbb\xbfa,b\n1,2\n3,4")
    batches = await read_to_end(Csv(path))
    assert values_of(batches) == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    assert batches[-1].position == path.stat().st_size


async def test_csv_empty_file_and_header_only(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"")
    assert await read_to_end(Csv(path)) == []
    path.write_bytes(b"a,b\n")
    assert await read_to_end(Csv(path)) == []


async def test_csv_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "missing.csv"
    with pytest.raises(ConnectorError, match=r"missing\.csv") as caught:
        await read_to_end(Csv(path))
    assert "\n" not in str(caught.value)


async def test_csv_follow_waits_for_file_header_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    follower = Follower(Csv(path, follow=True, poll_interval=0.01, types={"n": int}))
    try:
        await asyncio.sleep(0.05)
        path.write_bytes(b"id,n")  # the header, not finished yet
        await asyncio.sleep(0.05)
        with path.open("ab") as file:
            file.write(b'\na,1\nb,"2')  # the second row's quote is still open
        assert await follower.wait_for(1) == [{"id": "a", "n": 1}]
        await asyncio.sleep(0.05)
        assert len(follower.values) == 1
        with path.open("ab") as file:
            file.write(b'"\nc,3\n')
        assert await follower.wait_for(3) == [
            {"id": "a", "n": 1},
            {"id": "b", "n": 2},
            {"id": "c", "n": 3},
        ]
        assert follower.batches[-1].position == path.stat().st_size
    finally:
        await follower.stop()
