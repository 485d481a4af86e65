"""Every disk the pipeline makes boots: pull from the test registry, then ``hypeman-images boot``.

The VM is QEMU microvm (TCG here; KVM where it works) or Cloud Hypervisor when
installed. Each test checks what a user would: the command's output and exit
code, the config's user, env and working dir, and the effect of whiteouts.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.images import Image, alpine_3_20_3, make_image, make_layer
from support.push import push_image
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.tar import directory, file, hardlink, opaque, whiteout

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("hypeman-images"))
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def boot(
    data_dir: Path, ref: str, *command: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``boot`` with stdin at /dev/null (the command's too), or a pipe holding ``stdin``."""
    argv = [CLI, "boot", "--data-dir", str(data_dir), "--timeout", "90", ref]
    if command:
        argv += ["--", *command]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=180,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


def on_alpine(*upper: list[object], **config: object) -> Image:
    """Alpine 3.20.3's layer with more layers on top and the given config."""
    base = alpine_3_20_3().layers[0]
    layers = [base, *(make_layer(entries) for entries in upper)]  # type: ignore[arg-type]
    return make_image(layers, **config)  # type: ignore[arg-type]


def push(registry: RegistryServer, name: str, image: Image) -> str:
    push_image(registry.url, f"boot/{name}", "1", image)
    return f"{registry.host}/boot/{name}:1"


def test_alpine_release(alpine_ref: PushedImage, data_dir: Path) -> None:
    result = boot(data_dir, alpine_ref.ref, "cat", "/etc/alpine-release")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3.20.3\n"
    # Which hypervisor and accelerator ran it, as the KVM probe decided.
    said = re.search(
        r"booted with (qemu|cloud-hypervisor) \((kvm|tcg)\); exit code 0$", result.stderr
    )
    assert said is not None, result.stderr
    verdicts = {p.read_text().strip() for p in (data_dir / "boot").glob("kvm-probe-*")}
    # Without a usable /dev/kvm nothing is probed: TCG.
    assert said.group(2) in (verdicts or {"tcg"}), verdicts


def test_a_hanging_command_ends_at_the_timeout_with_exit_11(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    argv = [CLI, "boot", "--data-dir", str(data_dir), "--timeout", "5", alpine_ref.ref]
    started = time.monotonic()
    result = subprocess.run(
        [*argv, "--", "sh", "-c", "echo started; exec sleep 600"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    # Exit 11 (docs/cli.md, "Exit codes"): the VM did not boot or run the command.
    assert result.returncode == 11, result.stderr
    # Under TCG on a loaded host the boot itself may use up the 5 s: either message is clear.
    said = re.search(
        r"hypeman-images: error: the (command did not finish within 5 s; the VM was stopped|"
        r"VM did not start the command within 5 s) \((qemu|cloud-hypervisor)/(kvm|tcg)\)",
        result.stderr,
    )
    assert said, result.stderr
    assert "HYPEMAN" not in result.stderr, "no marker of the init's protocol"
    if said[1].startswith("command"):
        # What it printed came as it ran, on stdout, and is not repeated in the error.
        assert result.stdout == "started\n" and "started" not in result.stderr
    # The pull, the KVM probe (at most 6 s) and the 5 s boot; never the 600 s of sleep.
    assert elapsed < 60


def test_exit_code_is_the_commands(alpine_ref: PushedImage, data_dir: Path) -> None:
    result = boot(data_dir, alpine_ref.ref, "sh", "-c", "echo out; exit 7")
    assert result.returncode == 7
    assert result.stdout == "out\n"


def test_busybox_default_command(busybox_ref: PushedImage, data_dir: Path) -> None:
    # cmd is ["sh"] with stdin at /dev/null: it runs and exits 0, as `docker run busybox` does.
    assert boot(data_dir, busybox_ref.ref).returncode == 0
    result = boot(data_dir, busybox_ref.ref, "sh", "-c", "busybox | head -1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("BusyBox v1.38.0")


def test_user_env_and_working_dir_from_config(registry: RegistryServer, data_dir: Path) -> None:
    image = on_alpine(
        [directory("srv/app", uid=1000, gid=1000), file("srv/app/hello", b"hi\n")],
        cmd=["sh", "-c", 'id -u; id -g; pwd; echo "$GREETING"; cat hello'],
        env=[PATH, "GREETING=hello from the config"],
        working_dir="/srv/app",
        user="1000:1000",
    )
    result = boot(data_dir, push(registry, "user", image))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1000", "1000", "/srv/app", "hello from the config", "hi"]


def test_user_by_name(registry: RegistryServer, data_dir: Path) -> None:
    image = on_alpine(cmd=["id", "-un"], env=[PATH], user="nobody")
    result = boot(data_dir, push(registry, "nobody", image))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "nobody\n"


def test_missing_entrypoint(registry: RegistryServer, data_dir: Path) -> None:
    image = on_alpine(entrypoint=["/no/such/program"], cmd=["--flag"], env=[PATH])
    result = boot(data_dir, push(registry, "missing", image))
    assert result.returncode == 127
    assert 'hypeman-images: command not found in the image: "/no/such/program"' in result.stderr
    assert "entrypoint" not in result.stderr


def test_a_missing_command_is_command_not_found(alpine_ref: PushedImage, data_dir: Path) -> None:
    result = boot(data_dir, alpine_ref.ref, "nosuch", "--flag")
    assert result.returncode == 127, result.stderr
    assert 'hypeman-images: command not found in the image: "nosuch" (PATH=' in result.stderr
    assert result.stdout == ""
    # The image ID list prints names it here too.
    by_id = boot(data_dir, alpine_ref.manifest_digest[7:19], "cat", "/etc/alpine-release")
    assert (by_id.returncode, by_id.stdout) == (0, "3.20.3\n"), by_id.stderr


def test_stdin_passes_through_a_pipe(alpine_ref: PushedImage, data_dir: Path) -> None:
    """``echo hi | hypeman-images boot alpine -- cat`` prints hi, as ``docker run -i`` does."""
    result = boot(data_dir, alpine_ref.ref, "cat", stdin="hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"
    # Without a pipe the command reads /dev/null, and a command that reads
    # nothing ends whatever the pipe still holds.
    assert boot(data_dir, alpine_ref.ref, "cat").stdout == ""
    counted = boot(data_dir, alpine_ref.ref, "wc", "-c", stdin="x" * 100_000)
    assert counted.returncode == 0 and counted.stdout.strip() == "100000"
    assert boot(data_dir, alpine_ref.ref, "true", stdin="ignored\n" * 1000).returncode == 0


def test_stdin_passes_through_a_terminal(alpine_ref: PushedImage, data_dir: Path) -> None:
    """Typed lines reach the command; Ctrl-D ends its input, as on any terminal."""
    argv = [CLI, "boot", "--data-dir", str(data_dir), "--timeout", "90", alpine_ref.ref]
    master, slave = pty.openpty()
    with subprocess.Popen(
        [*argv, "--", "sh", "-c", "cat; echo done"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        os.close(slave)
        os.write(master, b"typed line\n")
        os.write(master, b"\x04")  # VEOF: the end of the input
        out, err = process.communicate(timeout=120)
    os.close(master)
    assert process.returncode == 0, err
    assert out == b"typed line\ndone\n"


def test_the_output_streams_as_the_command_prints_it(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    assert boot(data_dir, alpine_ref.ref, "true").returncode == 0  # pulled and probed
    argv = [CLI, "boot", "--data-dir", str(data_dir), "--timeout", "90", alpine_ref.ref]
    script = "echo first; sleep 6; echo second"
    with subprocess.Popen(
        [*argv, "--", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        first = process.stdout.readline()
        seen_first = time.monotonic()
        second = process.stdout.readline()
        seen_second = time.monotonic()
        process.wait(120)
    assert (first, second) == (b"first\n", b"second\n")
    # "first" came out while the command slept, not with the rest at power-off.
    assert seen_second - seen_first > 3


def test_whiteouts_take_effect_in_the_vm(registry: RegistryServer, data_dir: Path) -> None:
    image = on_alpine(
        # Layer 2: delete a file and a directory, make /etc/apk opaque with one new file.
        [
            whiteout("etc/motd"),
            whiteout("etc/periodic"),
            opaque("etc/apk"),
            directory("etc/apk"),
            file("etc/apk/only", b"only child\n"),
        ],
        # Layer 3: a hard link to a file of the base layer, then replace the original.
        [hardlink("etc/issue.link", "etc/issue"), file("etc/issue", b"replaced\n")],
        cmd=[
            "sh",
            "-c",
            "test -e /etc/motd && echo motd; test -e /etc/periodic && echo periodic; "
            "ls /etc/apk; cat /etc/issue; head -c 7 /etc/issue.link; echo",
        ],
        env=[PATH],
    )
    result = boot(data_dir, push(registry, "whiteouts", image))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["only", "replaced", "Welcome"]


def test_print_command(alpine_ref: PushedImage, data_dir: Path) -> None:
    result = subprocess.run(
        [CLI, "boot", "--data-dir", str(data_dir), "--print-command", alpine_ref.ref],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("cloud-hypervisor ")
    assert "--kernel " in line and "readonly=on" in line
    disk = json.loads(
        subprocess.run(
            [CLI, "inspect", "--json", "--data-dir", str(data_dir), alpine_ref.ref],
            capture_output=True,
            text=True,
        ).stdout
    )["disk"]
    assert f"path={disk}" in line
