"""``make demo``: a real pull → ext4 → boot, on this machine alone.

1. start Debian's docker-registry on 127.0.0.1 (a free port, a temp dir);
2. build a small image from Debian's busybox-static (FROM scratch, one layer:
   /bin/busybox, its applet links, /etc/passwd and /etc/group; a user, env and
   working dir in the config) and push it over the registry API;
3. ``hypeman-images pull`` it, show ``inspect`` and a listing of the disk;
4. ``hypeman-images boot`` it and show the command's output.

The image builders are the test suite's (tests/support), so the demo and the
tests push images the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.images import make_image, make_layer  # noqa: E402
from tests.support.push import push_image  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402
from tests.support.tar import TarEntry  # noqa: E402

BUSYBOX = Path("/bin/busybox")


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


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run and echo a command, as a user would type it."""
    print(f"\n$ {' '.join(argv)}", flush=True)
    return subprocess.run(argv, check=True, text=True)


def main() -> None:
    """Run the demo end to end."""
    cli = str(Path(sys.executable).with_name("hypeman-images"))
    data_dir = ROOT / "demo-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    with (
        tempfile.TemporaryDirectory(prefix="hypeman-demo-") as tmp,
        start_registry(Path(tmp)) as registry,
    ):
        ref = f"{registry.host}/demo/busybox:1.0"
        digest = build_and_push(registry.url, "demo/busybox", "1.0")
        print(f"registry on {registry.url}; pushed {ref} ({digest})")
        env = {**os.environ, "HYPEMAN_DATA_DIR": str(data_dir)}
        os.environ.update(env)
        run(cli, "pull", ref)
        run(cli, "list")
        run(cli, "inspect", ref)
        disk = subprocess.run(
            [cli, "inspect", "--json", ref], check=True, capture_output=True, text=True
        ).stdout
        disk_path = __import__("json").loads(disk)["disk"]
        run("debugfs", "-R", "ls -l /srv/app", disk_path)
        run("e2fsck", "-fn", disk_path)
        if shutil.which("qemu-system-x86_64") or shutil.which("cloud-hypervisor"):
            run(cli, "boot", ref)


if __name__ == "__main__":
    main()
