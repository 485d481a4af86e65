"""The help's prose: the description, each command's examples, the exit-code table.

The exit-code table is generated from :mod:`hypeman_images.errors`, the one
source of the codes (tests/cli/test_cli.py compares what ``--help``
prints with it); so are the codes the examples mention.
"""

from __future__ import annotations

from hypeman_images.cli.output import PROG
from hypeman_images.errors import Conflict, CorruptDisk, exit_codes

DESCRIPTION = "Turn OCI container images into bootable ext4 disks for microVMs."


def epilog() -> str:
    """The top-level help's closing text: where to look next, then the exit codes."""
    table = "\n".join(f"  {code:>3} {meaning}" for code, meaning in exit_codes())
    return (
        f"Run '{PROG} COMMAND --help' for a command's options and examples.\n\nexit codes:\n{table}"
    )


EXAMPLES = {
    "pull": f"""\
--platform takes what docker takes: linux/arm64, linux/arm64/v8, arm64.

examples:
  {PROG} pull alpine:3.20
  {PROG} pull --platform arm64 ghcr.io/org/app@sha256:<hex>
  {PROG} pull --label team=infra --label env=prod localhost:5000/app:1
  {PROG} pull --json localhost:5000/app:1 | jq -r .disk""",
    "list": f"""\
One row per tag; IMAGE ID is the digest's first 12 hex digits, which every
command that takes an image accepts.

examples:
  {PROG} list
  {PROG} list alpine
  {PROG} list --label team=infra
  {PROG} rm $({PROG} list -q ghcr.io/org/app)
  {PROG} list --json | jq '.[] | select(.status == "ready") | .name'""",
    "inspect": f"""\
Control characters in what the image says (env, user, working dir...) are
printed as escapes (\\x1b); --json prints them exactly.

examples:
  {PROG} inspect alpine:3.20
  {PROG} inspect 3f57d9401f8d
  {PROG} inspect --json docker.io/library/alpine@sha256:<hex>""",
    "tag": f"""\
The target may be in another repository; the disk is shared, not copied.
The source must be ready.

examples:
  {PROG} tag alpine:3.20 alpine:prod
  {PROG} tag 3f57d9401f8d localhost:5000/base:1""",
    "rm": f"""\
A tag's disk is deleted with the last tag that points at it; a digest goes
with all its tags. An image that is being built cannot be removed (exit {Conflict.exit_code}).
Every image named is tried; the exit code is non-zero if any could not be removed.

examples:
  {PROG} rm alpine:3.20
  {PROG} rm docker.io/library/alpine@sha256:<hex>""",
    "gc": f"""\
Removes cached blobs no ready or in-progress image needs, the directories of
failed builds, and temp files left by interrupted ones.

examples:
  {PROG} gc
  {PROG} gc --json""",
    "verify": f"""\
Runs e2fsck -fn on the image's disk again and hashes it. If the disk's sha256
was recorded (at pull, unless --no-disk-digest; or verify --record later), it must still
match: a disk that fails either check exits {CorruptDisk.exit_code}; remove it and pull again.

examples:
  {PROG} verify alpine:3.20
  {PROG} verify --record --json docker.io/library/alpine@sha256:<hex>""",
    "boot": f"""\
Boots the image's disk (pulled first if it is not local) in a microVM: Cloud
Hypervisor when it is on PATH, else QEMU microvm with KVM where KVM works and
TCG where it does not. Prints the command's output as it comes and exits with
its code. A terminal or a pipe on stdin is the command's stdin (docker run -i).

examples:
  {PROG} boot alpine:3.20
  {PROG} boot alpine:3.20 -- cat /etc/alpine-release
  echo hi | {PROG} boot alpine:3.20 -- cat
  {PROG} boot --print-command alpine:3.20""",
    "login": f"""\
Stores the credential where docker and podman look (a credential helper if
one is configured, else ~/.docker/config.json, mode 0600) after checking it.

examples:
  {PROG} login -u me registry.example.com
  echo "$TOKEN" | {PROG} login -u me --password-stdin ghcr.io""",
    "logout": f"""\
examples:
  {PROG} logout registry.example.com""",
    "disk": f"""\
The cache is the repository --disk-cache (or $HYPEMAN_DISK_CACHE, or
registries.conf's disk-cache) names; it is reached as image registries are.

examples:
  {PROG} disk push --disk-cache registry.lan:5000/hypeman/disks alpine:3.20
  {PROG} disk pull --disk-cache registry.lan:5000/hypeman/disks alpine:3.20""",
    "serve": f"""\
Serves POST/GET /images, GET/DELETE /images/{{name}}, /healthz, /metrics and
/openapi.json. Builds interrupted by a crash or restart are resumed at start.
The token file holds one bearer token and must not be readable by group or
others (chmod 600). Without one, serve listens on loopback only and answers
only its own names in the Host header (--allowed-host adds one).
Logs one key=value line per request and per build state change (-v: debug).

examples:
  {PROG} serve --listen 127.0.0.1:8080
  {PROG} serve --listen 0.0.0.0:8080 --token-file /etc/hypeman/token --concurrency 4
  curl -H "Authorization: Bearer $(cat token)" -d '{{"name":"alpine"}}' \\
       -H 'Content-Type: application/json' http://127.0.0.1:8080/images""",
}
