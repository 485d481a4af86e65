#!/bin/sh
# PID 1 of the hypeman boot proof, run by the static busybox of the initramfs.
#
# It mounts the image disk (/dev/vda, ext4 or erofs, read-only) under a tmpfs overlay,
# runs the image's command inside it with the image's env, working dir and
# user, prints the exit code between markers on the console and powers off.
# What to run comes from /etc/hypeman/run.conf, a second cpio archive appended
# per boot (shell assignments quoted by Python), so arguments with spaces or
# quotes survive. Markers carry a per-boot nonce so that a command cannot fake
# them. This script must never exit: PID 1 exiting panics the kernel.

BB=/bin/busybox
export PATH=/bin
$BB --install -s /bin 2>/dev/null

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Byte-exact output: no \n -> \r\n translation on the serial line; and no
# echo, so the stdin relayed to the command does not come back as output.
stty -onlcr -echo </dev/console 2>/dev/null

. /etc/hypeman/run.conf

finish() {
    # Right after the output, no newline of ours before it: the host hands the
    # output on as it comes and cannot wait to see if a newline was ours.
    printf 'HYPEMAN_EXIT_%s=%s\n' "$HM_NONCE" "$1"
    # ACPI power-off works on QEMU microvm and Cloud Hypervisor; reboot=t with
    # QEMU -no-reboot is the fallback when it does not.
    poweroff -f
    reboot -f
    while :; do sleep 60; done
}

fail() {
    code=$1
    shift
    echo "hypeman-init: $*" >&2
    printf '\nHYPEMAN_ERROR_%s=%s\n' "$HM_NONCE" "$*"
    finish "$code"
}

# The hypervisor probe only needs to know that the kernel reaches userspace.
[ "$HM_PROBE" = 1 ] && finish 0

# virtio_mmio learns its devices from "virtio_mmio.device=" on the cmdline
# when there is no ACPI; insmod (unlike modprobe) does not read the cmdline.
# An EROFS disk needs the erofs module too (docs/design.md, "EROFS disks").
HM_FSTYPE=${HM_FSTYPE:-ext4}
modules=$(cat /etc/hypeman/modules)
[ "$HM_FSTYPE" = erofs ] && modules="$modules $(cat /etc/hypeman/modules-erofs)"
for name in $modules; do
    params=
    for word in $(cat /proc/cmdline); do
        case $word in "$name".*) params="$params ${word#"$name".}" ;; esac
    done
    # shellcheck disable=SC2086
    insmod "/lib/modules/$name.ko" $params || fail 125 "cannot load kernel module $name"
done

tries=0
while [ ! -b /dev/vda ]; do
    tries=$((tries + 1))
    [ $tries -gt 1000 ] && fail 125 "no disk: /dev/vda did not appear within 10 s"
    usleep 10000
done

mount -t "$HM_FSTYPE" -o ro /dev/vda /lower ||
    fail 125 "cannot mount /dev/vda read-only as $HM_FSTYPE"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail 125 "cannot mount the tmpfs for the overlay"
mkdir /rw/upper /rw/work
# The merged root takes its owner and mode from the upper dir: copy the disk's.
chmod "$(stat -c %a /lower)" /rw/upper
chown "$(stat -c %u:%g /lower)" /rw/upper
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
    fail 125 "cannot mount the overlay on the disk"

R=/newroot
mkdir -p $R/proc $R/sys $R/dev
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm

# Resolve user, group, working dir and command inside the image's root, so
# its absolute symlinks resolve within it (/proc/1/root is this init's root,
# which reaches our busybox from inside the chroot). Shell builtins only:
# every exec costs a lot under TCG. Prints uid, gid, home, the physical
# working dir, the command's path and the groups (comma-separated), one a
# line; or a message and exits 126 (user, group, working dir) or 127
# (command not found).
LOOKUP='
user=$1 group=$2 workdir=$3 path=$4 argv0=$5
num() { case $1 in "" | *[!0-9]*) return 1 ;; esac; }
uid=$user gid=0 home=/ found=0 name=
if [ -r /etc/passwd ]; then
    while IFS=: read -r n _ u g _ h _; do
        if { num "$user" && [ "$u" = "$user" ]; } || [ "$n" = "$user" ]; then
            uid=$u gid=$g home=${h:-/} found=1 name=$n
            break
        fi
    done </etc/passwd
fi
num "$user" || [ $found = 1 ] || {
    echo "no user \"$user\" in /etc/passwd of the image"
    exit 126
}
if [ -n "$group" ] && num "$group"; then
    gid=$group
elif [ -n "$group" ]; then
    found=0
    if [ -r /etc/group ]; then
        while IFS=: read -r n _ g _; do
            [ "$n" = "$group" ] && { gid=$g found=1; break; }
        done </etc/group
    fi
    [ $found = 1 ] || {
        echo "no group \"$group\" in /etc/group of the image"
        exit 126
    }
fi
# Supplementary groups as Docker sets them: the gid, then (when no group was
# given and the user has a passwd entry) every group that lists the user by
# name as a member (moby getUser, runc GetExecUser).
groups=$gid
if [ -z "$group" ] && [ -n "$name" ] && [ -r /etc/group ]; then
    while IFS=: read -r n _ g members; do
        num "$g" || continue
        case ",$members," in
            *",$name,"*)
                case ",$groups," in *",$g,"*) ;; *) groups=$groups,$g ;; esac
                ;;
        esac
    done </etc/group
fi
[ -d "$workdir" ] || mkdir -p "$workdir" 2>/dev/null
cd -P "$workdir" 2>/dev/null || {
    echo "working dir \"$workdir\" is not a directory in the image"
    exit 126
}
resolved=
case $argv0 in
    */*) [ -f "$argv0" ] && [ -x "$argv0" ] && resolved=$argv0 ;;
    *)
        IFS=:
        for d in $path; do
            if [ -f "${d:-.}/$argv0" ] && [ -x "${d:-.}/$argv0" ]; then
                resolved=${d:-.}/$argv0
                break
            fi
        done
        ;;
esac
[ -n "$resolved" ] || {
    case $argv0 in
        */*) echo "command not found in the image: \"$argv0\"" ;;
        *) echo "command not found in the image: \"$argv0\" (PATH=$path)" ;;
    esac
    exit 127
}
printf "%s\n" "$uid" "$gid" "$home" "$PWD" "$resolved" "$groups"
'

[ "$HM_ARGC" -gt 0 ] || fail 126 "no command: the image has neither entrypoint nor cmd"

# Positional parameters become: env -i ENV... busybox nsenter ... -- ARGV...
# setpriv (run before env -i, so the image's LD_* variables never reach it)
# sets the gid and the supplementary groups; nsenter from the initramfs
# busybox chroots, changes dir, drops to the uid (-S alone keeps the groups;
# its -G would clear them) and execs the command, so the image needs no shell
# or tool of its own.
path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
has_path=0
has_home=0
set --
i=1
while [ $i -le "$HM_ENVC" ]; do
    eval "item=\$HM_ENV_$i"
    case $item in
        PATH=*)
            path=${item#PATH=}
            has_path=1
            ;;
        HOME=*) has_home=1 ;;
    esac
    set -- "$@" "$item"
    i=$((i + 1))
done

# User: "uid", "uid:gid", "name", "name:group", as Docker reads them from the
# image's own /etc/passwd and /etc/group. A numeric uid need not exist there.
# Docker creates a missing working dir; the overlay makes that possible here.
user=${HM_USER%%:*}
group=
case $HM_USER in *:*) group=${HM_USER#*:} ;; esac
argv0=$HM_ARG_1
found=$(chroot $R /proc/1/root$BB sh -c "$LOOKUP" hm "${user:-0}" "$group" \
    "${HM_WORKDIR:-/}" "$path" "$argv0")
code=$?
[ $code = 0 ] || fail $code "$found"
{
    read -r uid
    read -r gid
    read -r home
    read -r realdir
    read -r resolved
    read -r groups
} <<END_OF_LOOKUP
$found
END_OF_LOOKUP

[ $has_path = 1 ] || set -- "$@" "PATH=$path"
[ $has_home = 1 ] || set -- "$@" "HOME=$home"
# This busybox prefers its own applets over PATH when asked to exec a bare
# name (FEATURE_PREFER_APPLETS): "sh" would run our sh, not the image's. A
# path with a slash is always exec'd from the image.
case $argv0 in
    */*) ;;
    *) $BB --list | grep -qxF -- "$argv0" && HM_ARG_1=$resolved ;;
esac

# nsenter opens the working dir before it chroots: give it the physical path.
set -- "$@" $BB nsenter "-r$R" "-w$R$realdir" -S "$uid" -F --
i=1
while [ $i -le "$HM_ARGC" ]; do
    eval "set -- \"\$@\" \"\$HM_ARG_$i\""
    i=$((i + 1))
done

# The host's stdin, when it passes it on (HM_STDIN=1), arrives on the console
# as lines: "D" and the bytes as printf octal escapes, then "E" at its end
# (boot/vm.py, _Relay). The relay turns them back into bytes on a pipe, as
# `docker run -i` gives a pipe; else stdin is /dev/null. The output is a pipe,
# not a terminal, so programs print plain text (no colours, no tty queries).
relay() {
    while IFS= read -r line; do
        case $line in
            D*) printf "${line#D}" ;;
            *) break ;;
        esac
    done
}
stdin=/dev/null relay_pid=
if [ "$HM_STDIN" = 1 ]; then
    mkfifo /hm-stdin
    relay </dev/console >/hm-stdin &
    relay_pid=$!
    stdin=/hm-stdin
fi
set -o pipefail
echo "HYPEMAN_BEGIN_$HM_NONCE"
/usr/bin/setpriv --regid="$gid" --groups="$groups" -- $BB env -i "$@" <"$stdin" 2>&1 | cat
code=$?
# The command may end without reading all its input: the relay goes with it.
[ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null
finish $code
