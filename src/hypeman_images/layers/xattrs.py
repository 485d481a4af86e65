"""The xattr policy: what happens to each extended attribute on its way to the disk.

One table (:data:`XATTR_POLICY`), as umoci keeps its own in
``oci/layer/utils.go``: an xattr is carried in the tar stream (mke2fs -d sets
it), set by the disk step after mke2fs (an :class:`XattrFixup`), or dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Xattrs = tuple[tuple[str, bytes], ...]


class XattrAction(enum.Enum):
    """What happens to one extended attribute on its way to the disk."""

    TAR = "carried in the tar stream; mke2fs -d sets it"
    FIXUP = "set after mke2fs by the disk step (debugfs ea_set)"
    DROP = "dropped"


# First match wins; a name matches an entry equal to it or starting with it when the
# entry ends in '.' or '_'. Like umoci's table in oci/layer/utils.go, in one place.
XATTR_POLICY: tuple[tuple[str, XattrAction, str], ...] = (
    (
        "security.capability",
        XattrAction.TAR,
        "file capabilities; create_inode_libarchive.c copies exactly this one",
    ),
    ("security.selinux", XattrAction.DROP, "host-specific label; umoci ignores it as well"),
    (
        "trusted.overlay.",
        XattrAction.DROP,
        "overlayfs state of the build host; as a lower layer it would change what VMs see",
    ),
    ("gnu.translator", XattrAction.DROP, "GNU Hurd only"),
    ("user.", XattrAction.FIXUP, "mke2fs -d drops it"),
    ("trusted.", XattrAction.FIXUP, "mke2fs -d drops it"),
    ("security.", XattrAction.FIXUP, "mke2fs -d drops it (e.g. security.ima)"),
    ("system.posix_acl_", XattrAction.FIXUP, "ACLs; debugfs converts to the ext4 format"),
)


def xattr_action(name: str) -> XattrAction:
    """The policy for xattr ``name``; unknown namespaces are dropped (Linux refuses them)."""
    for key, action, _why in XATTR_POLICY:
        if name == key or (key[-1] in "._" and name.startswith(key)):
            return action
    return XattrAction.DROP


def tar_xattrs(xattrs: Xattrs) -> Xattrs:
    """The xattrs mke2fs sets from the tar stream itself (the rest are fixups or dropped)."""
    if not xattrs:
        return xattrs
    return tuple((k, v) for k, v in xattrs if xattr_action(k) is XattrAction.TAR)


@dataclass(frozen=True)
class XattrFixup:
    """An xattr the disk step must set after mke2fs: ``path`` is absolute (``b"/"`` root)."""

    path: bytes
    name: str
    value: bytes
