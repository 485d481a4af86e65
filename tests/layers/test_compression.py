"""Decompressing readers: media type and magic must agree; corruption is a LayerError."""

from __future__ import annotations

import gzip
import io
import os

import pytest
import zstandard

from hypeman_images.errors import LayerError
from hypeman_images.layers.compression import open_decompressed

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZS = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DATA = os.urandom(300_000) + b"\0" * 700_000


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _zs(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def read(blob: bytes, media_type: str, **kw: int) -> bytes:
    with open_decompressed(io.BytesIO(blob), media_type, name="sha256:feed", **kw) as s:
        return s.read()


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [(GZ, _gz), (DOCKER_GZ, _gz), (ZS, _zs), (TAR, lambda d: d)],
    ids=["oci-gzip", "docker-gzip", "zstd", "none"],
)
@pytest.mark.parametrize("read_ahead", [0, 1, 16])
def test_round_trip(media_type: str, compress: object, read_ahead: int) -> None:
    assert callable(compress)
    assert read(compress(DATA), media_type, read_ahead=read_ahead) == DATA


def test_concatenated_gzip_members_and_zstd_frames() -> None:
    assert read(_gz(DATA[:1000]) + _gz(DATA[1000:]), GZ) == DATA
    assert read(_zs(DATA[:1000]) + _zs(DATA[1000:]), ZS) == DATA


def test_path_source(tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    blob = tmp_path / "blob"
    blob.write_bytes(_zs(DATA))
    with open_decompressed(blob, ZS, name="x") as s:
        assert s.read() == DATA


@pytest.mark.parametrize(
    ("blob", "media_type", "says"),
    [
        (_zs(b"x"), GZ, "says gzip but the content is zstd"),
        (_gz(b"x"), ZS, "says zstd but the content is gzip"),
        (_gz(b"x"), TAR, "says none but the content is gzip"),
        (b"plain tar", GZ, "says gzip but the content is not compressed"),
    ],
    ids=["zstd-as-gzip", "gzip-as-zstd", "gzip-as-tar", "tar-as-gzip"],
)
def test_media_type_and_magic_must_agree(blob: bytes, media_type: str, says: str) -> None:
    with pytest.raises(LayerError, match=says):
        read(blob, media_type)


def test_unknown_media_type() -> None:
    with pytest.raises(LayerError, match="unsupported layer media type"):
        read(b"", "application/x-foo")


@pytest.mark.parametrize("media_type,compress", [(GZ, _gz), (ZS, _zs)], ids=["gzip", "zstd"])
def test_truncated_stream_names_the_layer(media_type: str, compress: object) -> None:
    assert callable(compress)
    blob = compress(DATA)
    with pytest.raises(LayerError, match=r"sha256:feed.*truncated"):
        read(blob[: len(blob) // 2], media_type)


@pytest.mark.parametrize("media_type,compress", [(GZ, _gz), (ZS, _zs)], ids=["gzip", "zstd"])
def test_corrupt_stream_names_the_layer(media_type: str, compress: object) -> None:
    assert callable(compress)
    blob = bytearray(compress(DATA))
    for i in range(4, 40):  # frame and block headers: both decoders must notice
        blob[i] ^= 0x55
    with pytest.raises(LayerError, match="sha256:feed"):
        read(bytes(blob), media_type)


def test_zstd_window_limit() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown:
    blob = cobj.compress(DATA) + cobj.flush()  # the frame keeps its 256 MiB window
    with pytest.raises(LayerError, match="sha256:feed"):
        read(blob, ZS, zstd_max_window=1 << 20)


class _Trickle(io.RawIOBase):
    """A pipe-like source that hands over at most ``step`` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._step, self.closed_by_reader = data, step, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._step, len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n

    def close(self) -> None:
        self.closed_by_reader = True
        super().close()


@pytest.mark.parametrize("step", [1, 3, 4, 1 << 16])
@pytest.mark.parametrize(("media_type", "compress"), [(GZ, _gz), (ZS, _zs)], ids=["gzip", "zstd"])
def test_sources_that_deliver_a_few_bytes_at_a_time(
    step: int, media_type: str, compress: object
) -> None:
    # A download's chunks reach the scan through such a pipe: the magic bytes
    # may arrive split across reads and must still be sniffed, and not lost.
    assert callable(compress)
    source = _Trickle(compress(DATA[:20_000]), step)
    with open_decompressed(source, media_type, name="x") as s:  # type: ignore[arg-type]
        assert s.read() == DATA[:20_000]
    assert source.closed_by_reader


@pytest.mark.parametrize(("media_type", "compress"), [(GZ, _gz), (ZS, _zs)], ids=["gzip", "zstd"])
def test_read_ahead_reports_corruption_where_it_is(media_type: str, compress: object) -> None:
    assert callable(compress)
    blob = compress(DATA)
    cut = blob[: len(blob) // 2]
    with open_decompressed(io.BytesIO(cut), media_type, name="sha256:cut", read_ahead=4) as s:
        got = bytearray()
        with pytest.raises(LayerError, match="sha256:cut"):
            while chunk := s.read(4096):
                got += chunk
    assert DATA.startswith(bytes(got))  # everything before the damage came through


def test_read_ahead_reads_of_any_size_and_an_early_close_stop_the_thread() -> None:
    import threading

    before = threading.active_count()
    big = os.urandom(3 << 20) * 3
    with open_decompressed(io.BytesIO(_gz(big)), GZ, name="x", read_ahead=2) as s:
        parts = [s.read(1), s.read(1 << 20), s.read(12345), s.read(5 << 20)]
        assert b"".join(parts) == big[: sum(map(len, parts))]
        assert s.read() == big[sum(map(len, parts)) :]
        assert s.read(10) == b""
    # Closed after a few bytes of a long stream: the decoder, blocked on a full
    # queue, stops too.
    s = open_decompressed(io.BytesIO(_gz(big)), GZ, name="x", read_ahead=1)
    assert s.read(10) == big[:10]
    s.close()
    assert threading.active_count() == before
