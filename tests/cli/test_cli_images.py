"""The habits users bring from docker, podman, crane and skopeo, as they meet them in a shell.

Flags before the command, ``list``'s filters and formats, ``rm`` that goes on
past a failure, short IDs, ``inspect`` that never lets an image write to the
terminal. Each test runs ``hypeman-images`` in a subprocess against the
session's registry on 127.0.0.1 and checks what is printed and the exit code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.images import make_image, make_layer
from support.push import push_image
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.service import CLI
from support.tar import directory, file

from hypeman_images.cli.listing import ago, render, table_rows
from hypeman_images.cli.output import printable

ESC = "\x1b"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env={**os.environ, "COLUMNS": "80"},
    )


def pulled(data_dir: Path, *refs: str, extra: tuple[str, ...] = ()) -> None:
    for ref in refs:
        result = run("pull", "--data-dir", str(data_dir), *extra, ref)
        assert result.returncode == 0, result.stderr


# -- global flags ------------------------------------------------------------------------


def test_common_flags_work_before_the_command_too(alpine_ref: PushedImage, data_dir: Path) -> None:
    pulled(data_dir, alpine_ref.ref)
    after = run("list", "--data-dir", str(data_dir), "--json")
    before = run("--data-dir", str(data_dir), "list", "--json")
    assert after.returncode == before.returncode == 0
    assert json.loads(before.stdout) == json.loads(after.stdout) != []
    # -v before the command turns on debug logging as after it does.
    host = alpine_ref.registry.host
    missing = f"{host}/library/alpine:nope"
    loud = run("-v", "--data-dir", str(data_dir), "pull", missing)
    assert loud.returncode == 3
    assert "DEBUG hypeman_images.registry" in loud.stderr
    # Both places at once: the one after the command wins, as for any repeated flag.
    other = data_dir.parent / "other"
    both = run("--data-dir", str(other), "list", "--data-dir", str(data_dir), "-q")
    assert both.stdout.strip() == alpine_ref.manifest_digest[7:19]


def test_data_dir_group_works_before_the_command() -> None:
    from hypeman_images.cli.parser import parse_args

    assert parse_args(["--data-dir-group", "images", "list"]).data_dir_group == "images"
    assert parse_args(["list", "--data-dir-group", "images"]).data_dir_group == "images"
    args = parse_args(["--data-dir-group", "a", "list", "--data-dir-group", "b"])
    assert args.data_dir_group == "b"


# -- list --------------------------------------------------------------------------------


def test_list_filters_by_repository_and_prints_ids_with_q(
    alpine_ref: PushedImage, busybox_ref: PushedImage, data_dir: Path
) -> None:
    pulled(data_dir, alpine_ref.ref, busybox_ref.ref)
    d = ("--data-dir", str(data_dir))
    alpine_id, busybox_id = alpine_ref.manifest_digest[7:19], busybox_ref.manifest_digest[7:19]

    assert run("list", *d, "-q").stdout.split() == [alpine_id, busybox_id]
    host = alpine_ref.registry.host
    only = run("list", *d, "-q", f"{host}/library/alpine")
    assert only.returncode == 0 and only.stdout.split() == [alpine_id]
    assert run("list", *d, "-q", f"{host}/library/alpine:3.20.3").stdout.split() == [alpine_id]
    assert run("list", *d, "-q", f"{host}/library/alpine:other").stdout == ""
    assert run("list", *d, "-q", f"{host}/library/nothing").stdout == ""

    as_json = json.loads(run("list", *d, "--format", "json", f"{host}/library/busybox").stdout)
    assert [i["digest"] for i in as_json] == [busybox_ref.manifest_digest]
    assert run("list", *d, "--format", "yaml").returncode == 2


def test_list_table_is_dockers(alpine_ref: PushedImage, data_dir: Path) -> None:
    pulled(data_dir, alpine_ref.ref)
    result = run("list", "--data-dir", str(data_dir))
    assert result.returncode == 0
    header, row = result.stdout.splitlines()
    assert header.split("  ")[0] == "REPOSITORY"
    assert re.split(r"\s{2,}", header) == [
        "REPOSITORY",
        "TAG",
        "IMAGE ID",
        "CREATED",
        "SIZE",
        "STATUS",
    ]
    cells = re.split(r"\s{2,}", row)
    assert cells[:3] == [
        f"{alpine_ref.registry.host}/library/alpine",
        "3.20.3",
        alpine_ref.manifest_digest[7:19],
    ]
    assert re.fullmatch(r"just now|\d+ seconds? ago|1 minute ago", cells[3]), cells[3]
    assert cells[4].endswith("MiB") and cells[5] == "ready"
    assert "PLATFORM" not in header and "SOURCE" not in header  # all alike: no column


def test_list_shows_platform_only_when_there_are_several(
    multiplatform_ref: PushedImage, data_dir: Path
) -> None:
    pulled(data_dir, multiplatform_ref.ref)
    assert "PLATFORM" not in run("list", "--data-dir", str(data_dir)).stdout
    pulled(data_dir, multiplatform_ref.ref, extra=("--platform", "linux/arm64/v8"))
    lines = run("list", "--data-dir", str(data_dir)).stdout.splitlines()
    assert "PLATFORM" in lines[0]
    platforms = sorted(re.split(r"\s{2,}", line)[5] for line in lines[1:])
    assert platforms[0] == "linux/amd64" and platforms[1].startswith("linux/arm64")


def test_the_default_table_fits_80_columns() -> None:
    """Everyday names (Hub images, a ghcr.io one), each status, one row per tag."""
    from hypeman_images.build.image import Image, image_view
    from hypeman_images.store.images import ImageRecord, ImageStatus

    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    created = (now - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def image(repository: str, tags: tuple[str, ...], status: ImageStatus, **kw: Any) -> Image:
        digest = "sha256:" + "3f57d9401f8d" * 5 + "abcd"
        record = ImageRecord(repository, digest, status, created, platform="linux/amd64", **kw)
        position = 2 if status is ImageStatus.PENDING else None
        return image_view(record, repository, tags, Path("/nowhere"), queue_position=position)

    images = [
        image(
            "docker.io/library/alpine", ("3.20", "latest"), ImageStatus.READY, size_bytes=9 << 20
        ),
        image("ghcr.io/org/app", ("v1.2.3",), ImageStatus.PENDING),
        image("docker.io/library/python", (), ImageStatus.FAILED, error="interrupted " * 20),
    ]
    lines = list(render(table_rows(images, now)))
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert [line.split()[:2] for line in lines[1:]] == [
        ["alpine", "3.20"],
        ["alpine", "latest"],
        ["ghcr.io/org/app", "v1.2.3"],
        ["python", "<none>"],
    ]
    assert "2 hours ago" in lines[1] and "pending (#2)" in lines[3]
    assert lines[4].endswith("  failed: interrupte…")


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(seconds=0), "just now"),
        (timedelta(seconds=45), "45 seconds ago"),
        (timedelta(minutes=1, seconds=30), "1 minute ago"),
        (timedelta(hours=2, minutes=59), "2 hours ago"),
        (timedelta(days=3), "3 days ago"),
        (timedelta(days=20), "2 weeks ago"),
        (timedelta(days=100), "3 months ago"),
        (timedelta(days=800), "2 years ago"),
    ],
    ids=["now", "seconds", "minute", "hours", "days", "weeks", "months", "years"],
)
def test_created_reads_as_time_ago(delta: timedelta, text: str) -> None:
    now = datetime(2025, 6, 1, tzinfo=UTC)
    assert ago((now - delta).strftime("%Y-%m-%dT%H:%M:%SZ"), now) == text


# -- rm ----------------------------------------------------------------------------------


def test_rm_removes_what_it_can_and_reports_each_failure(
    alpine_ref: PushedImage, busybox_ref: PushedImage, data_dir: Path
) -> None:
    pulled(data_dir, alpine_ref.ref, busybox_ref.ref)
    missing = f"{alpine_ref.registry.host}/library/missing:1"
    result = run("rm", "--data-dir", str(data_dir), alpine_ref.ref, missing, busybox_ref.ref)
    assert result.returncode == 3  # not found: the missing one
    assert result.stdout.splitlines() == [
        f"removed {alpine_ref.ref}",
        f"removed {alpine_ref.digest_ref}",
        f"removed {busybox_ref.ref}",
        f"removed {busybox_ref.digest_ref}",
    ]
    assert result.stderr.splitlines() == [
        f"hypeman-images: error: no local image {missing} (pull it first: hypeman-images pull)"
    ]
    assert run("list", "--data-dir", str(data_dir), "-q").stdout == ""


def test_rm_json_lists_removed_and_failed(alpine_ref: PushedImage, data_dir: Path) -> None:
    pulled(data_dir, alpine_ref.ref)
    missing = f"{alpine_ref.registry.host}/library/missing:1"
    result = run("rm", "--json", "--data-dir", str(data_dir), missing, alpine_ref.ref)
    assert result.returncode == 3
    doc = json.loads(result.stdout)
    assert doc["removed"] == [alpine_ref.ref, alpine_ref.digest_ref]
    assert doc["code"] == "not_found" and doc["exit_code"] == 3
    assert [e["image"] for e in doc["errors"]] == [missing]


# -- inspect -----------------------------------------------------------------------------


def test_inspect_escapes_what_the_image_could_write_to_a_terminal(
    registry: RegistryServer, data_dir: Path
) -> None:
    hostile = {
        "env": [f"TITLE={ESC}]0;owned{chr(7)}", "CLEAR=a\rb", f"CSI=x{chr(0x9B)}2J"],
        "working_dir": f"/srv/{ESC}[31mred",
        "user": f"root{ESC}[8m",
        "cmd": ["echo", f"{ESC}]8;;http://evil{ESC}\\link"],
    }
    image = make_image([make_layer([directory("srv"), file("srv/x", b"x")])], **hostile)  # type: ignore[arg-type]
    push_image(registry.url, "test/hostile-config", "1", image)
    ref = f"{registry.host}/test/hostile-config:1"
    pulled(data_dir, ref)

    text = run("inspect", "--data-dir", str(data_dir), ref)
    assert text.returncode == 0
    for control in (ESC, "\r", chr(7), chr(0x9B)):
        assert control not in text.stdout
    assert r"working_dir:  /srv/\x1b[31mred" in text.stdout
    assert r"env:          TITLE=\x1b]0;owned\x07" in text.stdout
    assert r"env:          CLEAR=a\rb" in text.stdout
    assert r"user:         root\x1b[8m" in text.stdout
    # JSON stays exact.
    doc = json.loads(run("inspect", "--json", "--data-dir", str(data_dir), ref).stdout)
    assert doc["env"] == hostile["env"] and doc["working_dir"] == hostile["working_dir"]
    assert doc["user"] == hostile["user"] and doc["cmd"] == hostile["cmd"]


def test_printable_escapes_c0_del_and_c1_only() -> None:
    assert printable("é ü → ok\\") == "é ü → ok\\"
    assert printable("\x00\x1b\x7f\x85\x9f\t\n") == r"\x00\x1b\x7f\x85\x9f\t\n"


# -- image IDs, tag, labels, platforms ----------------------------------------------------


def test_the_id_list_prints_names_the_image_everywhere(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    pulled(data_dir, alpine_ref.ref)
    d = ("--data-dir", str(data_dir))
    (image_id,) = run("list", *d, "-q").stdout.split()
    assert image_id == alpine_ref.manifest_digest[7:19]

    for name in (image_id, alpine_ref.manifest_digest, alpine_ref.manifest_digest[7:]):
        shown = run("inspect", *d, name)
        assert shown.returncode == 0, shown.stderr
        assert f"digest:       {alpine_ref.manifest_digest}" in shown.stdout
    checked = run("verify", *d, image_id)
    assert checked.returncode == 0 and checked.stdout.startswith("ok: ")

    too_short = run("inspect", *d, image_id[:8])  # under 12 digits: a repository name
    assert too_short.returncode == 3, too_short.stderr
    assert run("inspect", *d, "0" * 12).returncode == 3

    removed = run("rm", *d, image_id)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {alpine_ref.digest_ref}" in removed.stdout.splitlines()
    assert run("list", *d, "-q").stdout == ""


def test_an_ambiguous_id_is_refused_with_its_matches(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    pulled(data_dir, alpine_ref.ref)
    d = ("--data-dir", str(data_dir))
    other = data_dir / "images" / "docker.io" / "library" / "lookalike"
    source = next((data_dir / "images").glob("*/library/alpine/*/metadata.json")).parent
    # A second repository holding the same digest: one ID, two images.
    assert run("tag", *d, alpine_ref.ref, "lookalike:1").returncode == 0
    assert (other / source.name).is_dir()
    result = run("inspect", *d, alpine_ref.manifest_digest[7:19])
    assert result.returncode == 2
    assert "ambiguous" in result.stderr and "lookalike" in result.stderr
    assert "library/alpine" in result.stderr


def test_tag_gives_a_ready_image_another_name(alpine_ref: PushedImage, data_dir: Path) -> None:
    pulled(data_dir, alpine_ref.ref)
    d = ("--data-dir", str(data_dir))
    tagged = run("tag", *d, alpine_ref.ref, f"{alpine_ref.registry.host}/library/alpine:prod")
    assert tagged.returncode == 0 and tagged.stdout == "", tagged.stderr
    lines = run("list", *d).stdout.splitlines()
    assert [re.split(r"\s{2,}", line)[1] for line in lines[1:]] == ["3.20.3", "prod"]
    assert len({re.split(r"\s{2,}", line)[2] for line in lines[1:]}) == 1  # one image ID
    # By ID, into another repository; JSON on request.
    doc = json.loads(run("tag", *d, "--json", alpine_ref.manifest_digest[7:19], "mine:1").stdout)
    assert doc["name"] == "docker.io/library/mine:1" and doc["tags"] == ["1"]
    assert run("list", *d, "-q", "mine").stdout.split() == [alpine_ref.manifest_digest[7:19]]
    # Without a tag, or of an unknown image: an error and its exit code.
    assert run("tag", *d, alpine_ref.ref, "mine@" + alpine_ref.manifest_digest).returncode == 2
    assert run("tag", *d, "nothing:here", "mine:2").returncode == 3


def test_labels_set_on_pull_filter_list(
    alpine_ref: PushedImage, busybox_ref: PushedImage, data_dir: Path
) -> None:
    d = ("--data-dir", str(data_dir))
    pulled(data_dir, alpine_ref.ref, extra=("--label", "team=infra", "--label", "env=prod"))
    pulled(data_dir, busybox_ref.ref, extra=("--label", "team=web"))
    alpine_id, busybox_id = alpine_ref.manifest_digest[7:19], busybox_ref.manifest_digest[7:19]
    assert run("list", *d, "-q", "--label", "team=infra").stdout.split() == [alpine_id]
    assert run("list", *d, "-q", "--label", "team=web").stdout.split() == [busybox_id]
    both = ("--label", "team=infra", "--label", "env=prod")
    assert run("list", *d, "-q", *both).stdout.split() == [alpine_id]
    assert run("list", *d, "-q", "--label", "team=infra", "--label", "env=dev").stdout == ""
    doc = json.loads(run("inspect", *d, "--json", alpine_ref.ref).stdout)
    assert doc["user_labels"] == {"team": "infra", "env": "prod"}
    assert "user_labels:  team=infra, env=prod" in run("inspect", *d, alpine_ref.ref).stdout
    bad = run("list", *d, "--label", "novalue")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


@pytest.mark.parametrize("platform", ["arm64", "linux/arm64/v8", "linux/arm64"])
def test_platform_takes_the_forms_docker_takes(
    multiplatform_ref: PushedImage, data_dir: Path, platform: str
) -> None:
    d = ("--data-dir", str(data_dir))
    result = run("pull", *d, "--json", "--platform", platform, multiplatform_ref.ref)
    assert result.returncode == 0, result.stderr
    arm64 = multiplatform_ref.index.images[1].manifest_digest  # type: ignore[union-attr]
    assert json.loads(result.stdout)["digest"] == arm64
    assert json.loads(result.stdout)["platform"].startswith("linux/arm64")


def test_error_messages_never_write_control_characters(data_dir: Path) -> None:
    result = run("inspect", "--data-dir", str(data_dir), f"{ESC}]0;owned{chr(7)}:1")
    assert result.returncode == 2
    assert ESC not in result.stderr and chr(7) not in result.stderr
    assert result.stderr.count("\n") == 1
    bad = run("pull", "--data-dir", str(data_dir), "--label", "a!b=1", "alpine")
    assert bad.returncode == 2 and "invalid --label: invalid label key 'a!b'" in bad.stderr
