#!/usr/bin/env bash
# Put /var/lib/docker on xfs mounted with project quotas (`prjquota`), so Docker's
# `--storage-opt size=` (each runner's disk_mb, executor/disk.py) holds. Run at boot by
# runnerhub-docker-storage.service, before Docker starts; installed by install-executor.sh.
# The volume: the one labelled rh-docker (a reboot), else $RUNNERHUB_DOCKER_DEVICE, else the
# one blank whole disk that is not the root's (the launch template's second EBS volume,
# infra/runnerhub_infra/executors.py). Formatted once; what the AMI left in /var/lib/docker
# (pre-pulled runner images) is copied onto it the first time. No such disk: nothing changes
# (the executor then reports that Docker does not enforce disk limits; job disks still do).
set -euo pipefail

# Another directory only for tests (tests/isolation/test_disk.py).
readonly TARGET=${RUNNERHUB_DOCKER_ROOT:-/var/lib/docker}
readonly LABEL=rh-docker
say() { echo "[docker-storage] $*" >&2; }

options=$(findmnt -n -o OPTIONS --target "$TARGET" 2>/dev/null || true)
if grep -Eq '(^|,)(prjquota|pquota)(,|$)' <<<"$options"; then
    say "$TARGET is already on a filesystem with project quotas"
    exit 0
fi
device=$(blkid -L "$LABEL" 2>/dev/null || true)
mounted=$(findmnt -n -o SOURCE --mountpoint "$TARGET" || true)
if [ -n "$device" ] && [ "$mounted" = "$device" ]; then
    say "$TARGET is already on $device"
    exit 0
fi
if [ -z "$device" ]; then
    device=${RUNNERHUB_DOCKER_DEVICE:-}
    if [ -z "$device" ]; then
        root_source=$(findmnt -n -o SOURCE /)
        root_disk=$(lsblk -no PKNAME "$root_source" 2>/dev/null | head -n 1 || true)
        root_disk=${root_disk:-$(basename "$root_source")}  # a root filesystem on a whole disk
        blank=()
        while read -r name type; do
            [ "$type" = disk ] || continue
            # EBS and instance-store disks only (never zram, loop or ram devices).
            case $(basename "$name") in nvme* | xvd* | sd* | vd*) ;; *) continue ;; esac
            [ "$(basename "$name")" != "$root_disk" ] || continue
            # No partitions, no filesystem or other signature, not mounted, not swap: never
            # format a disk in use.
            [ "$(lsblk -nro NAME "$name" | wc -l)" = 1 ] || continue
            [ -z "$(blkid -p -o value -s TYPE "$name" 2>/dev/null)" ] || continue
            [ -z "$(lsblk -nro MOUNTPOINT "$name")" ] || continue
            ! grep -q "^$name " /proc/swaps || continue
            blank+=("$name")
        done < <(lsblk -dpno NAME,TYPE)
        if [ ${#blank[@]} -ne 1 ]; then
            say "no single blank data disk (${#blank[@]} found): $TARGET stays where it is"
            exit 0
        fi
        device=${blank[0]}
    fi
    say "formatting $device as xfs ($LABEL)"
    mkfs.xfs -q -L "$LABEL" "$device"
fi
# Project quotas, or (a kernel whose xfs lacks quota support) the volume's space without them.
options=prjquota
staging=$(mktemp -d)
if ! mount -o "$options" "$device" "$staging" 2>/dev/null; then
    options=defaults
    say "no project quotas on this kernel: Docker will not enforce disk limits (job disks do)"
    mount -o "$options" "$device" "$staging"
fi
if ! [ -e "$staging/.runnerhub-copied" ] && [ -d "$TARGET" ]; then
    say "copying the AMI's $TARGET onto $device"
    cp -a "$TARGET/." "$staging/"
fi
touch "$staging/.runnerhub-copied"
umount "$staging"
rmdir "$staging"
mkdir -p "$TARGET"
mount -o "$options" "$device" "$TARGET"
say "$TARGET on $device (xfs, $options)"
