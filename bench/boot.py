"""Boot-time benchmark: hypervisor start → first output of the command → power-off.

Builds an ext4 disk from the Alpine 3.20.3 minirootfs, boots it N times with
``cat /etc/alpine-release`` and prints the medians. The first (cold) run,
which builds the initramfs and probes KVM, is reported apart.

    .venv/bin/python bench/boot.py [-n 5] [--hypervisor qemu] [--accel tcg]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.images import IMAGES_DIR

from hypeman_images.boot import RunSpec, boot

ALPINE = IMAGES_DIR / "alpine-minirootfs-3.20.3-x86_64.tar.gz"
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def make_disk(tarball: Path, disk: Path) -> None:
    """Write an ext4 disk of 64 MiB holding the gzipped tarball's files."""
    with disk.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-b", "4096", "-d", "-", str(disk)],
        input=gzip.decompress(tarball.read_bytes()),
        check=True,
    )


def main() -> None:
    """Run the benchmark and print one line per measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--hypervisor", choices=["qemu", "cloud-hypervisor"])
    parser.add_argument("--accel", choices=["kvm", "tcg"])
    parser.add_argument("--tarball", type=Path, default=ALPINE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hypeman-bench-") as tmp:
        work = Path(tmp)
        disk = work / "rootfs.ext4"
        make_disk(args.tarball, disk)
        spec = RunSpec(env=(PATH,), cmd=("cat", "/etc/alpine-release"))

        def once() -> tuple[float, float, float | None, str]:
            result = boot(
                disk,
                spec,
                hypervisor=args.hypervisor,
                accel=args.accel,
                work_dir=work / "w",
                cache_dir=work / "c",
            )
            if result.exit_code != 0 or result.time_to_first_output is None:
                raise SystemExit(f"boot failed: exit {result.exit_code}: {result.output}")
            machine = f"{result.hypervisor}/{result.accelerator}"
            return (
                result.time_to_first_output,
                result.time_to_exit,
                result.time_to_poweroff,
                machine,
            )

        t0 = time.monotonic()
        once()
        cold = time.monotonic() - t0
        runs = [once() for _ in range(args.runs)]
    machine = runs[-1][3]
    first = statistics.median(r[0] for r in runs)
    exited = statistics.median(r[1] for r in runs)
    offs = [r[2] for r in runs if r[2] is not None]
    print(f"machine            {machine}")
    print(f"cold first boot    {cold:.2f} s (initramfs build + KVM probe + boot)")
    print(f"to first output    {first:.2f} s (median of {args.runs})")
    print(f"to exit marker     {exited:.2f} s")
    if offs:
        print(f"to power-off       {statistics.median(offs):.2f} s")
    else:
        print("to power-off       never (the VM was killed after the command)")


if __name__ == "__main__":
    main()
