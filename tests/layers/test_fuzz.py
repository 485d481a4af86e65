"""Property-based fuzzing of every parser that reads untrusted input.

The rule: on any input, a parser returns a value or raises a
:class:`~hypeman_images.errors.HypemanError` subclass; anything else escaping
(``TypeError``, ``KeyError``, ``RecursionError``, ...) is a bug. The targets:

- the reference parser (user input from the CLI and the API), plus: a parsed
  reference prints canonically and lands inside the image store;
- the manifest, index and config parsers (registry input), on raw bytes, on
  arbitrary JSON and on real documents with fields replaced by garbage;
- the tar reader and the flattener (layer input), on raw bytes, on valid tars
  with bytes flipped or cut, and on tars of hostile entry specs; merged paths
  never leave the root;
- the decompressors, on corrupted gzip and zstd streams;
- a disk cache's artifact manifests, configs and referrers indexes, and a
  registry's error bodies (the fleet's input).

Runs are bounded for CI (``max_examples`` below); ``fuzz/`` has atheris
entry points for longer runs. Crashes found become the explicit examples
(``@example``) at the top of each test.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.fleet import FAST, artifact_of, recipe_for, subject_for
from support.images import make_image, make_layer
from support.tar import TarEntry, build_tar

from hypeman_images.errors import HypemanError
from hypeman_images.fleet.artifact import ARTIFACT_TYPE, check_artifact, parse_manifest
from hypeman_images.fleet.config import DiskConfig
from hypeman_images.layers.compression import open_decompressed
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.merge import merge
from hypeman_images.layers.scan import scan_layer
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.oci.spec import (
    OCI_INDEX,
    OCI_MANIFEST,
    media_type_of,
    parse_config,
    parse_manifest_or_index,
)
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.referrers import list_referrers
from hypeman_images.registry.responses import error_details
from hypeman_images.store.images import ImageStore

FUZZ = settings(
    # A few seconds per target in CI; HYPEMAN_FUZZ_EXAMPLES=20000 for a longer local run.
    max_examples=int(os.environ.get("HYPEMAN_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
LIMITS = Limits(max_entries=2000, max_layer_bytes=8 << 20, max_header_bytes=64 << 10)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)


# -- references --------------------------------------------------------------------------

reference_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="abc09.-_/:@%", max_size=80),
    st.lists(st.sampled_from(["a", "..", ".", "/", ":", "@", "sha256:", "0" * 64, "%2e", "\\", "\0",
                              "localhost", "127.0.0.1:5000", "UP", "-", "__"]),
             max_size=12).map("".join),
)  # fmt: skip


@FUZZ
@given(reference_text)
@example("alpine@sha256:" + "0" * 64)
@example("a" * 300)
def test_reference_parser(text: str) -> None:
    try:
        ref = parse_reference(text)
    except HypemanError:
        return
    again = parse_reference(str(ref))
    assert again == ref
    root = Path("/nonexistent/images")
    digest = ref.digest or Digest("sha256", "0" * 64)
    store = object.__new__(ImageStore)  # no directory is created: only the path is computed
    store.root = root
    try:
        directory = store.digest_dir(ref, digest)
    except HypemanError:
        return  # a name the store's layout refuses (e.g. a 64-hex component), never a crash
    parts = directory.relative_to(root).parts
    assert ".." not in parts and "." not in parts and "" not in parts
    assert directory.resolve(strict=False).is_relative_to(root)


@FUZZ
@given(st.text(max_size=100))
def test_digest_parser(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except HypemanError:
        return
    assert Digest.parse(str(digest)) == digest
    assert "/" not in digest.encoded and ".." not in digest.encoded


# -- manifests and configs ---------------------------------------------------------------

REAL = make_image([make_layer([TarEntry("file", b"a", content=b"x")])], cmd=["/bin/sh"])
MEDIA_TYPES = st.sampled_from(
    [OCI_MANIFEST, OCI_INDEX, "application/vnd.docker.distribution.manifest.v2+json",
     "application/vnd.docker.distribution.manifest.list.v2+json",
     "application/vnd.docker.distribution.manifest.v1+prettyjws", "text/plain", ""]
)  # fmt: skip


def _replace_somewhere(doc: Any, path: list[int], value: Any) -> Any:
    """``doc`` with one nested value (chosen by ``path``) replaced by ``value``."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = keys[path[0] % len(keys)]
    out = dict(doc) if isinstance(doc, dict) else list(doc)
    out[key] = _replace_somewhere(doc[key], path[1:], value)  # type: ignore[index]
    return out


def _mutations(real: list[Any]) -> st.SearchStrategy[bytes]:
    """Raw bytes, any JSON, and ``real`` documents with one nested value replaced."""
    mutated = st.builds(
        lambda doc, path, value: json.dumps(_replace_somewhere(doc, path, value)).encode(),
        st.sampled_from(real),
        st.lists(st.integers(0, 20), max_size=5),
        json_values,
    )
    return st.one_of(
        st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()), mutated
    )


@FUZZ
@given(
    _mutations([json.loads(REAL.manifest), json.loads(REAL.config)]),
    MEDIA_TYPES,
    st.none() | st.text(max_size=30),
)
@example(b'{"config":{"ExposedPorts":5},"rootfs":{}}', OCI_MANIFEST, None)
@example(b'{"config":{},"rootfs":{"diff_ids":5}}', OCI_MANIFEST, None)
@example(
    b'{"layers":[],"config":{"digest":"sha256:' + b"0" * 64 + b'","size":1e400}}',
    OCI_MANIFEST,
    None,
)
@example(b"[" * 100_000 + b"]" * 100_000, OCI_MANIFEST, None)
# A number past int()'s digit limit raised a bare ValueError (tests/oci/test_wire.py).
@example(b'{"schemaVersion":2,"x":' + b"9" * 5000 + b"}", OCI_MANIFEST, None)
def test_manifest_and_config_parsers(data: bytes, media_type: str, header: str | None) -> None:
    for parse in (
        lambda: media_type_of(data, header),
        lambda: parse_manifest_or_index(data, media_type),
        lambda: parse_config(data),
    ):
        with contextlib.suppress(HypemanError):
            parse()


# -- a disk cache's documents and a registry's answers --------------------------------------

ARTIFACT = artifact_of(b"disk" * 1000, subject_for("fuzz"), recipe_for(subject_for("fuzz")))
INDEX = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [ARTIFACT.referrer().to_json()]}
ERROR = {"errors": [{"code": "DENIED", "message": "no", "detail": {"a": [1]}}]}


@FUZZ
@given(_mutations([json.loads(ARTIFACT.manifest.data), json.loads(ARTIFACT.config_data)]))
@example(ARTIFACT.manifest.data.replace(b'offset":"0"', b'offset":"' + b"1" * 5000 + b'"'))
@example(b'{"disk_size":' + b"9" * 5000 + b"}")
@example(b"[" * 100_000)
def test_disk_artifact_parsers(data: bytes) -> None:
    """A disk cache's manifest and config: parsed and held to each other, or refused."""
    with contextlib.suppress(HypemanError):
        manifest = parse_manifest(data, Digest.of(data))
        check_artifact(manifest, ARTIFACT.config, ARTIFACT.config_data, manifest.subject.digest)
    with contextlib.suppress(HypemanError):
        config = DiskConfig.parse(data)
        check_artifact(ARTIFACT.manifest, config, data, ARTIFACT.manifest.subject.digest)


@FUZZ
@given(_mutations([INDEX, ERROR]))
@example(b'{"errors":' + b"9" * 5000 + b"}")
@example(b"[" * 100_000)
def test_referrers_index_and_error_bodies(data: bytes) -> None:
    """The fallback tag's index as anyone may write it, and an error body as any registry
    may send it. httpx's MockTransport stands in for the registry: docker-registry checks
    what is pushed to it and could not serve most of these."""
    codes, message = error_details(data)
    assert all(isinstance(code, str) for code in codes) and isinstance(message, str)

    def registry(request: httpx.Request) -> httpx.Response:
        if "/referrers/" in request.url.path:
            return httpx.Response(404)
        return httpx.Response(200, content=data, headers={"Content-Type": OCI_INDEX})

    subject = ARTIFACT.manifest.subject.digest
    repo = Reference("registry.example", "cache/disks")
    with (
        RegistryClient(transport=httpx.MockTransport(registry), config=FAST) as client,
        contextlib.suppress(HypemanError),
    ):
        found = list_referrers(client, repo, subject, ARTIFACT_TYPE)
        assert all(entry.artifact_type == ARTIFACT_TYPE for entry in found.entries)


# -- layers ----------------------------------------------------------------------------------

names = st.one_of(
    st.binary(min_size=1, max_size=40),
    st.lists(st.sampled_from([b"a", b"b", b"..", b".", b"", b".wh.a", b".wh..wh..opq", b".wh.",
                              b"/", b"etc", b"\xff", b"x" * 256]),
             min_size=1, max_size=6).map(b"/".join),
)  # fmt: skip
entries = st.builds(
    TarEntry,
    kind=st.sampled_from(["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]),
    name=names,
    content=st.binary(max_size=64),
    linkname=names | st.just(b""),
    mode=st.integers(0, 0o7777777),
    uid=st.integers(0, 1 << 40),
    mtime=st.integers(-(1 << 40), 1 << 40),
    devmajor=st.integers(0, 4095),
    pax=st.dictionaries(st.sampled_from(["path", "linkpath", "size", "uid", "mtime",
                                         "SCHILY.xattr.user.a", "GNU.sparse.map", "hdrcharset"]),
                        st.binary(max_size=20), max_size=2),
)  # fmt: skip


def _flatten(layers: list[bytes]) -> None:
    """Scan and merge ``layers``; only HypemanError may escape; the result stays inside."""
    try:
        scans = [scan_layer(io.BytesIO(tar), i, limits=LIMITS) for i, tar in enumerate(layers)]
        tree = merge(scans, LIMITS)
    except HypemanError:
        return
    for path in tree.nodes():
        parts = path.split(b"/")
        assert not path.startswith(b"/")
        assert b".." not in parts and b"" not in parts[1:]
        # image-spec layer.md: ".wh." names are markers, never files of the image.
        assert not any(part.startswith(b".wh.") for part in parts), path


@FUZZ
@given(st.lists(st.lists(entries, max_size=8), min_size=1, max_size=3))
# An opaque marker under a ".wh." directory made that directory (found by this test).
@example([[TarEntry("char", b".wh./.wh..wh..opq")]])
# A sparse map's count past int()'s digit limit raised a bare ValueError.
@example(
    [[TarEntry("file", b"f", pax={"GNU.sparse.map": b"0,0", "GNU.sparse.numblocks": b"9" * 5000})]]
)
def test_flatten_hostile_entry_specs(layers: list[list[TarEntry]]) -> None:
    _flatten([build_tar(layer) for layer in layers])


VALID_TAR = build_tar(
    [TarEntry("dir", b"etc/", mode=0o755), TarEntry("file", b"etc/passwd", content=b"root\n" * 50),
     TarEntry("symlink", b"lib", linkname=b"usr/lib"),
     TarEntry("hardlink", b"pw", linkname=b"etc/passwd"),
     TarEntry("file", b"x" * 150, content=b"long name", xattrs={"user.k": b"\0\1"})]
)  # fmt: skip


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_TAR) - 1), st.integers(0, 255)), max_size=8),
    st.integers(0, len(VALID_TAR)),
)
def test_flatten_mutated_tar(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID_TAR)
    for offset, value in flips:
        data[offset] = value
    _flatten([bytes(data[:cut]) if cut else bytes(data)])


@FUZZ
@given(st.binary(max_size=4096))
def test_flatten_random_bytes(data: bytes) -> None:
    _flatten([data])


@FUZZ
@given(
    st.sampled_from(["gzip", "zstd"]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 10_000),
)
def test_decompressors_on_corrupt_streams(
    kind: str, flips: list[tuple[int, int]], cut: int
) -> None:
    blob = bytearray(
        gzip.compress(VALID_TAR, mtime=0) if kind == "gzip"
        else zstandard.ZstdCompressor(write_checksum=True).compress(VALID_TAR)
    )  # fmt: skip
    for offset, value in flips:
        blob[offset % len(blob)] = value
    if cut:
        blob = blob[: cut % (len(blob) + 1)]
    media_type = f"application/vnd.oci.image.layer.v1.tar+{kind}"
    try:
        with open_decompressed(io.BytesIO(bytes(blob)), media_type, name="fuzz") as stream:
            scan_layer(stream, 0, limits=LIMITS)
    except HypemanError:
        pass


# -- the atheris targets of fuzz/ ---------------------------------------------------------

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
ATHERIS_TARGETS = sorted(p.name for p in FUZZ_DIR.glob("fuzz_*.py"))
ATHERIS_RUNS = 500


def test_every_atheris_target_is_run_below() -> None:
    assert ATHERIS_TARGETS == [
        "fuzz_artifacts.py", "fuzz_documents.py", "fuzz_layer.py", "fuzz_reference.py",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("target", ATHERIS_TARGETS)
def test_atheris_target_runs_clean(target: str, tmp_path: Path) -> None:
    """Each fuzz/ entry point, a few hundred coverage-guided runs: it works, and finds nothing.

    A failure here is a crash (an exception other than HypemanError) or a target
    that no longer starts; its input is written to ``tmp_path``. The long run is
    in fuzz/README.md.
    """
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ_DIR / target),
            f"-runs={ATHERIS_RUNS}",
            "-max_total_time=60",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {ATHERIS_RUNS} runs" in result.stderr, result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == [], "no crash, leak or timeout input written"
