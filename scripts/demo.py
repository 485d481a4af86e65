"""``make demo``: a real pull → ext4 → boot, on this machine alone.

1. start Debian's docker-registry on 127.0.0.1 (a free port, a temp dir);
2. build a small image from Debian's busybox-static (FROM scratch, one layer:
   /bin/busybox, its applet links, /etc/passwd and /etc/group; a user, env and
   working dir in the config) and push it over the registry API;
3. ``hypeman-images pull`` it, show ``inspect`` and a listing of the disk;
4. ``hypeman-images boot`` it and show the command's output.

The README promises the boot, so the demo fails (exit 1, one clear line)
when it cannot boot: checked before anything starts (a kernel, QEMU or
Cloud Hypervisor, busybox), and again if the VM does not run the command.
``--data-dir DIR`` keeps the store in DIR (as it is) instead of
``./demo-data`` (emptied first); tests/system/test_demo.py uses it.

The image builders are the test suite's (tests/support), so the demo and the
tests push images the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypeman_images.boot import find_kernel  # noqa: E402
from hypeman_images.boot.vm import CLOUD_HYPERVISOR, QEMU  # noqa: E402
from hypeman_images.errors import BootError  # noqa: E402
from tests.support.images import make_image, make_layer  # noqa: E402
from tests.support.push import push_image  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402
from tests.support.tar import TarEntry  # noqa: E402

BUSYBOX = Path("/bin/busybox")
DEFAULT_DATA_DIR = ROOT / "demo-data"
SETUP_HINT = "run `make demo` (it installs them) or scripts/setup-system.sh"


class DemoFailed(Exception):
    """A step of the demo failed; the message says which and what to do."""


def boot_blocker() -> str | None:
    """Why this machine cannot boot the demo's disk, or None if it can (as far as can be seen).

    Checked before anything starts, so a missing piece fails the demo in a
    second instead of after the pull.
    """
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} is missing (package busybox-static)"
    try:
        find_kernel()
    except BootError as exc:
        return exc.message
    if not (shutil.which(QEMU) or shutil.which(CLOUD_HYPERVISOR)):
        return f"no hypervisor: neither {QEMU} nor {CLOUD_HYPERVISOR} is on PATH"
    return None


def busybox_entries() -> list[TarEntry]:
    """The tree of a minimal busybox root filesystem."""
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    entries = [
        TarEntry("dir", name, mode=0o755)
        for name in (b"bin", b"etc", b"home", b"root", b"tmp", b"srv", b"srv/app")
    ]
    entries.append(TarEntry("file", b"bin/busybox", content=BUSYBOX.read_bytes(), mode=0o755))
    entries += [
        TarEntry("symlink", b"bin/" + a.encode(), linkname=b"busybox", mode=0o777)
        for a in applets
        if a != "busybox"
    ]
    entries += [
        TarEntry(
            "file",
            b"etc/passwd",
            content=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv/app:/bin/sh\n",
        ),
        TarEntry("file", b"etc/group", content=b"root:x:0:\napp:x:1000:\n"),
        TarEntry(
            "file", b"srv/app/hello.txt", content=b"hello from hypeman-images\n", uid=1000, gid=1000
        ),
    ]
    return entries


def build_and_push(registry_url: str, repo: str, tag: str) -> str:
    """Build the demo image and push it; return its manifest digest."""
    layer = make_layer(busybox_entries(), compression="gzip")
    image = make_image(
        [layer],
        cmd=["sh", "-c", 'echo "I am $(id -un) in $(pwd)"; cat hello.txt; uname -sr'],
        env=["PATH=/bin", "GREETING=hi"],
        working_dir="/srv/app",
        user="app",
    )
    return push_image(registry_url, repo, tag, image)


def run(*argv: str, what: str) -> None:
    """Run and echo a command, as a user would type it; fail the demo if it fails."""
    print(f"\n$ {shlex.join(argv)}", flush=True)
    result = subprocess.run(argv, text=True)
    if result.returncode != 0:
        raise DemoFailed(f"{what} failed (exit code {result.returncode}); see its error above")


def disk_of(cli: str, ref: str) -> str:
    """The disk's path, from ``inspect --json``."""
    shown = subprocess.run([cli, "inspect", "--json", ref], capture_output=True, text=True)
    if shown.returncode != 0:
        raise DemoFailed(f"inspect failed: {shown.stderr.strip()}")
    disk: str = json.loads(shown.stdout)["disk"]
    return disk


def demo(data_dir: Path) -> None:
    """Run the demo end to end, with the image store in ``data_dir``."""
    blocker = boot_blocker()
    if blocker is not None:
        raise DemoFailed(f"this machine cannot boot the demo's disk: {blocker}; {SETUP_HINT}")
    cli = str(Path(sys.executable).with_name("hypeman-images"))
    os.environ["HYPEMAN_DATA_DIR"] = str(data_dir)
    with (
        tempfile.TemporaryDirectory(prefix="hypeman-demo-") as tmp,
        start_registry(Path(tmp)) as registry,
    ):
        ref = f"{registry.host}/demo/busybox:1.0"
        digest = build_and_push(registry.url, "demo/busybox", "1.0")
        print(f"registry on {registry.url}; pushed {ref} ({digest})")
        run(cli, "pull", ref, what="the pull")
        run(cli, "list", what="list")
        run(cli, "inspect", ref, what="inspect")
        disk = disk_of(cli, ref)
        run("debugfs", "-R", "ls -l /", disk, what="the disk listing")
        run("debugfs", "-R", "ls -l /srv/app", disk, what="the disk listing")
        run("e2fsck", "-fn", disk, what="e2fsck")
        run(cli, "boot", ref, what="booting the disk")


def main(argv: list[str] | None = None) -> int:
    """``make demo``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"keep the image store here, as it is (default: {DEFAULT_DATA_DIR}, emptied first)",
    )
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir or DEFAULT_DATA_DIR
    if args.data_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)
    try:
        demo(data_dir.resolve())
    except DemoFailed as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    print("\ndemo: done: pulled, converted to ext4 and booted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
