#!/usr/bin/env bash
# Builds the Linux test guest for the VMM from Debian packages only:
#
#   OUT_DIR/vmlinuz         bzImage of Debian's cloud kernel (linux-image-<ver>-cloud-amd64)
#   OUT_DIR/vmlinux         the ELF kernel inside that bzImage, for the PVH entry (no decompressor
#                           to run: minutes saved under emulated KVM)
#   OUT_DIR/initramfs.cpio  uncompressed newc cpio: static busybox, a tiny port-write helper, /init
#   OUT_DIR/cmdline         the recommended kernel command line for the VMM
#   OUT_DIR/packages.txt    what was fetched (package, version, sha256 of the .deb)
#
# Usage: resources/linux/make-guest.sh [OUT_DIR]      (default: .guest at the repository root)
#
# Environment (all optional):
#   KERNEL_META     metapackage whose dependency names the kernel (default linux-image-cloud-amd64;
#                   linux-image-amd64 gives the generic kernel, which also parses MP tables)
#   KERNEL_PACKAGE  the real kernel package, skipping the metapackage lookup
#   EPF_MODULE      path to a pci_endpoint_test.ko built for that kernel, used when the kernel
#                   package has none (Debian 12's kernels are built without it)
#   BUILD_EPF_MODULE=1  when the kernel package has no pci_endpoint_test, build it out of tree from
#                   Debian's linux-source-<x.y> and linux-headers-<ver> packages (downloaded, not
#                   installed: about 155 MB more; needs make and the kernel's gcc-<N>). The result
#                   is kept in OUT_DIR/epf and reused.
#
# Only `apt-get download` reaches the network (after `apt-get update` when the package lists are
# missing). Downloads are kept in OUT_DIR/debs and not fetched again; the outputs are rebuilt on
# every run (a few seconds).
set -euo pipefail
# Without this, bash clears -e inside $(...): a function that dies in a command substitution
# would end only that subshell and the script would go on with an empty result.
shopt -s inherit_errexit

say() { printf 'make-guest: %s\n' "$*"; }
die() { printf 'make-guest: error: %s\n' "$*" >&2; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
OUT_DIR=${1:-$REPO_ROOT/.guest}
KERNEL_META=${KERNEL_META:-linux-image-cloud-amd64}
BUSYBOX_PACKAGE=busybox-static

for tool in apt-get apt-cache dpkg-deb sha256sum find sort; do
    command -v "$tool" >/dev/null || die "'$tool' not found (this script needs a Debian system)"
done
if command -v cpio >/dev/null; then
    CPIO_WITH=cpio
elif command -v python3 >/dev/null; then
    CPIO_WITH=python3
    say "cpio not found ('apt-get install cpio' to use it); writing the archive with python3"
else
    die "cpio not found: run 'apt-get install cpio'"
fi

mkdir -p "$OUT_DIR/debs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
DEB_DIR=$OUT_DIR/debs
WORK=$(mktemp -d "${TMPDIR:-/tmp}/make-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- package lists -----------------------------------------------------------------------------
if ! apt-cache show "$BUSYBOX_PACKAGE" >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "the apt package lists are missing; run 'apt-get update' as root"
    say "apt package lists missing: running apt-get update"
    apt-get update -q >/dev/null
fi

# Field of the candidate version of a package ("Version", "Architecture", ...).
candidate_field() {
    apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n "s/^$2: //p" | head -n1
}

# Downloads the candidate version of a package into DEB_DIR unless it is already there; prints the
# path of the .deb.
fetch() {
    local pkg=$1 ver arch file
    ver=$(candidate_field "$pkg" Version)
    arch=$(candidate_field "$pkg" Architecture)
    [ -n "$ver" ] || die "package '$pkg' is not known to apt (apt-get update?)"
    # apt-get download writes an epoch's ':' as %3a.
    file="$DEB_DIR/${pkg}_${ver//:/%3a}_${arch}.deb"
    if [ -s "$file" ]; then
        say "already downloaded: $pkg $ver" >&2
    else
        say "downloading $pkg $ver" >&2
        local sandbox=()
        # Root's apt drops to user _apt for downloads and warns when _apt cannot write here.
        [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)
        (cd "$DEB_DIR" && apt-get "${sandbox[@]}" -q download "$pkg=$ver" >&2) ||
            die "apt-get download $pkg=$ver failed"
        [ -s "$file" ] || die "apt-get download did not produce $file"
    fi
    printf '%s\n' "$file"
}

# --- kernel --------------------------------------------------------------------------------------
if [ -z "${KERNEL_PACKAGE:-}" ]; then
    # The metapackage depends on exactly one real image package, e.g. linux-image-6.1.0-56-cloud-amd64.
    flavour=${KERNEL_META#linux-image-}
    KERNEL_PACKAGE=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
        sed -n "s/^ *Depends: \(linux-image-[0-9][^ ]*-${flavour}\)\$/\1/p" | head -n1)
    [ -n "$KERNEL_PACKAGE" ] ||
        die "could not resolve $KERNEL_META to a linux-image-<version>-$flavour package (apt-cache depends $KERNEL_META)"
    say "$KERNEL_META -> $KERNEL_PACKAGE"
fi
kernel_deb=$(fetch "$KERNEL_PACKAGE")
busybox_deb=$(fetch "$BUSYBOX_PACKAGE")

say "extracting $(basename "$kernel_deb")"
dpkg-deb -x "$kernel_deb" "$WORK/kernel"
shopt -s nullglob
images=("$WORK"/kernel/boot/vmlinuz-*)
shopt -u nullglob
[ "${#images[@]}" -eq 1 ] || die "expected one boot/vmlinuz-* in $KERNEL_PACKAGE, found ${#images[@]}"
KVER=${images[0]##*/vmlinuz-}
MODULES_DIR=$WORK/kernel/lib/modules/$KVER
[ -d "$MODULES_DIR" ] || die "$KERNEL_PACKAGE has no lib/modules/$KVER"
cp "${images[0]}" "$OUT_DIR/vmlinuz.tmp"
mv "$OUT_DIR/vmlinuz.tmp" "$OUT_DIR/vmlinuz"

# --- vmlinux: the ELF inside the bzImage ---------------------------------------------------------
# Unsigned little-endian integer of WIDTH (1, 2, 4 or 8) bytes at OFFSET in FILE; empty past its end.
le() { od -An -v -tu"$3" -j "$2" -N "$3" "$1" | tr -d ' \n'; }
# WIDTH bytes at OFFSET in FILE, as lower-case hex.
hexat() { od -An -v -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }

# Succeeds when ELF FILE has a PT_NOTE holding the note Linux's PVH entry is found by: owner
# "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY, the 32-bit physical entry point).
has_pvh_note() {
    local f=$1 size phoff phentsize phnum i ph pos end namesz descsz
    size=$(stat -c %s "$f")
    [ "$size" -ge 64 ] && [ "$(hexat "$f" 0 5)" = 7f454c4602 ] || return 1 # a 64-bit ELF header
    phoff=$(le "$f" 32 8) phentsize=$(le "$f" 54 2) phnum=$(le "$f" 56 2)
    [ "$phentsize" -ge 56 ] && [ $((phoff + phnum * phentsize)) -le "$size" ] || return 1
    for ((i = 0; i < phnum; i++)); do
        ph=$((phoff + i * phentsize))
        [ "$(le "$f" "$ph" 4)" = 4 ] || continue # PT_NOTE
        pos=$(le "$f" $((ph + 8)) 8)
        end=$((pos + $(le "$f" $((ph + 32)) 8)))
        [ "$end" -le "$size" ] || return 1
        # Each note: namesz, descsz, type (4 bytes each), then name and desc, each padded to 4.
        while [ $((pos + 12)) -le "$end" ]; do
            namesz=$(le "$f" "$pos" 4) descsz=$(le "$f" $((pos + 4)) 4)
            if [ "$(le "$f" $((pos + 8)) 4)" = 18 ] && [ "$namesz" = 4 ] &&
                [ "$(hexat "$f" $((pos + 12)) 4)" = 58656e00 ]; then
                return 0
            fi
            pos=$((pos + 12 + (namesz + 3) / 4 * 4 + (descsz + 3) / 4 * 4))
        done
    done
    return 1
}

# Writes the ELF kernel inside bzImage $1 to $2. The setup header (boot protocol 2.08+) says
# where the compressed payload is; its first bytes, the compressor's magic, say which tool
# undoes it. Its last 4 bytes are the uncompressed size (appended by the kernel's build, or
# gzip's own ISIZE trailer), which the result must match.
extract_vmlinux() {
    local bz=$1 out=$2 setup_sects version offset length start magic tool pkg body expected
    [ "$(hexat "$bz" $((0x202)) 4)" = 48647253 ] || die "$bz is not a bzImage (no HdrS at 0x202)"
    version=$(le "$bz" $((0x206)) 2)
    [ "$version" -ge $((0x208)) ] ||
        die "$bz: boot protocol $(printf %#x "$version") has no payload fields (2.08+ needed)"
    setup_sects=$(le "$bz" $((0x1f1)) 1)
    [ "$setup_sects" -ne 0 ] || setup_sects=4 # what 0 meant to old loaders
    offset=$(le "$bz" $((0x248)) 4) length=$(le "$bz" $((0x24c)) 4)
    start=$(((setup_sects + 1) * 512 + offset))
    [ "$length" -gt 4 ] && [ $((start + length)) -le "$(stat -c %s "$bz")" ] ||
        die "$bz: payload ($length bytes at $start) lies outside the file"
    magic=$(hexat "$bz" "$start" 6)
    body=$((length - 4)) # without the appended size, which the decompressors take for garbage
    case "$magic" in
    1f8b08*) tool=(gzip -dc) pkg=gzip body=$length ;;
    fd377a585a00) tool=(xz -dc) pkg=xz-utils ;;
    5d0000*) tool=(xz --format=lzma -dc) pkg=xz-utils ;;
    425a68*) tool=(bzip2 -dc) pkg=bzip2 ;;
    02214c18*) tool=(lz4 -dc) pkg=lz4 ;;
    28b52ffd*) tool=(zstd -qdc) pkg=zstd ;;
    894c5a4f*) tool=(lzop -dc) pkg=lzop ;;
    *) die "$bz: unknown compression magic '$magic' at the payload (offset $start)" ;;
    esac
    command -v "${tool[0]}" >/dev/null ||
        die "$bz is compressed with ${tool[0]}, which is missing: apt-get install $pkg"
    expected=$(le "$bz" $((start + length - 4)) 4)
    # Unpacked in the work folder (removed on any exit), and no stale vmlinux left beside a
    # new vmlinuz if this fails.
    local tmp=$WORK/vmlinux
    rm -f "$out"
    dd if="$bz" iflag=skip_bytes,count_bytes skip="$start" count="$body" bs=1M status=none |
        "${tool[@]}" >"$tmp" ||
        die "${tool[*]} failed on the payload of $bz"
    [ "$(stat -c %s "$tmp")" = "$expected" ] ||
        die "$bz: the payload decompressed to $(stat -c %s "$tmp") bytes, its trailer says $expected"
    [ "$(hexat "$tmp" 0 5)" = 7f454c4602 ] || die "$bz: the payload is not a 64-bit ELF"
    has_pvh_note "$tmp" ||
        die "$bz: its vmlinux has no PVH note (Xen ELF note 18, XEN_ELFNOTE_PHYS32_ENTRY): this kernel cannot boot through PVH; boot the bzImage instead"
    mv "$tmp" "$out"
    say "vmlinux: $(stat -c %s "$out") bytes, ${tool[0]}-compressed in the bzImage, PVH note present"
}
extract_vmlinux "$OUT_DIR/vmlinuz" "$OUT_DIR/vmlinux"

config=$WORK/kernel/boot/config-$KVER
kconfig() { sed -n "s/^$1=//p" "$config" 2>/dev/null | head -n1; }
for opt in CONFIG_X86_MPPARSE CONFIG_DEVPORT CONFIG_PCI_ENDPOINT_TEST; do
    say "kernel $KVER: $opt=$(kconfig "$opt" | grep . || echo 'not set')"
done

# --- initramfs tree ------------------------------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,lib/modules,tmp}
chmod 1777 "$ROOT/tmp"
dpkg-deb -x "$busybox_deb" "$WORK/busybox"
[ -x "$WORK/busybox/bin/busybox" ] || die "$BUSYBOX_PACKAGE has no bin/busybox"
cp "$WORK/busybox/bin/busybox" "$ROOT/bin/busybox"
# The applets /init uses plus a few for poking around on a real host. The kernel's built-in
# initramfs already provides /dev/console, which init's stdin/stdout/stderr are opened on.
for applet in sh ash mount umount echo printf cat ls dd insmod rmmod lsmod modinfo poweroff \
    reboot halt sleep uname dmesg hexdump xxd devmem grep sed head tail mkdir rm mknod ln \
    test [ true false ps kill sync stat find wc tr cut od; do
    ln -s busybox "$ROOT/bin/$applet"
done

# /bin/outb: busybox cannot do port I/O and Debian's cloud kernel has no /dev/port
# (CONFIG_DEVPORT is not set), so this 202-byte static x86-64 ELF, written out here byte by byte,
# does it. It reads three bytes from stdin (port, little-endian u16; value, u8), calls
# ioperm(port, 1, 1), executes `out dx, al` and exits 0; exit 2 on short input, 1 if ioperm
# fails (needs CAP_SYS_RAWIO: init has it). Code (loaded at 0x400078, the entry point):
#   sub rsp,16; xor eax,eax; xor edi,edi; mov rsi,rsp; mov edx,3; syscall      read(0, rsp, 3)
#   cmp rax,3; jne bad
#   movzx edi,word [rsp]; mov esi,1; mov edx,1; mov eax,173; syscall          ioperm(port, 1, 1)
#   test rax,rax; jnz perm
#   movzx edx,word [rsp]; mov al,[rsp+2]; out dx,al; xor edi,edi; jmp quit
#   bad: mov edi,2; jmp quit
#   perm: mov edi,1
#   quit: mov eax,60; syscall                                                  exit(edi)
write_outb() {
    local hex=(
        # ELF header: 64-bit, little-endian, ET_EXEC, x86-64, entry 0x400078, program headers
        # at 64 (one, 56 bytes), no sections.
        7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00
        02 00 3e 00 01 00 00 00 78 00 40 00 00 00 00 00
        40 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        00 00 00 00 40 00 38 00 01 00 00 00 00 00 00 00
        # PT_LOAD, R+X, file offset 0 -> 0x400000, 202 bytes (0xca), align 4 KiB.
        01 00 00 00 05 00 00 00 00 00 00 00 00 00 00 00
        00 00 40 00 00 00 00 00 00 00 40 00 00 00 00 00
        ca 00 00 00 00 00 00 00 ca 00 00 00 00 00 00 00
        00 10 00 00 00 00 00 00
        # Code (82 bytes), as listed above.
        48 83 ec 10 31 c0 31 ff 48 89 e6 ba 03 00 00 00
        0f 05 48 83 f8 03 75 27 0f b7 3c 24 be 01 00 00
        00 ba 01 00 00 00 b8 ad 00 00 00 0f 05 48 85 c0
        75 14 0f b7 14 24 8a 44 24 02 ee 31 ff eb 0c bf
        02 00 00 00 eb 05 bf 01 00 00 00 b8 3c 00 00 00
        0f 05
    )
    local byte
    for byte in "${hex[@]}"; do printf "\\x$byte"; done >"$1"
    [ "$(stat -c %s "$1")" -eq 202 ] || die "internal error: outb helper is not 202 bytes"
    chmod 755 "$1"
}
write_outb "$ROOT/bin/outb"

# "package version sha256" of a .deb, for packages.txt.
deb_line() {
    printf '%s %s %s\n' "$(dpkg-deb -f "$1" Package)" "$(dpkg-deb -f "$1" Version)" \
        "$(sha256sum "$1" | cut -d' ' -f1)"
}

# Why a package the module build needs could not be downloaded, and what to do instead. The
# mirror can list headers for a kernel ABI it does not serve yet (or any more): a 404.
epf_download_hint() {
    local older="an older ABI"
    # 6.1.0-57-cloud-amd64 -> linux-image-6.1.0-56-cloud-amd64, as an example of the form.
    if [[ $KVER =~ ^([0-9.]+)-([0-9]+)-(.+)$ ]] && [ "${BASH_REMATCH[2]}" -gt 0 ]; then
        older="linux-image-${BASH_REMATCH[1]}-$((BASH_REMATCH[2] - 1))-${BASH_REMATCH[3]}"
    fi
    printf '%s' "downloading $1 failed, and BUILD_EPF_MODULE=1 needs it to build pci_endpoint_test" \
        " for $KVER. If the mirror does not serve this kernel's headers, build for a kernel whose" \
        " headers it has: KERNEL_PACKAGE=$older (check with 'apt-get download" \
        " linux-headers-<that release>'), or give a module built elsewhere with EPF_MODULE=PATH."
}

# Builds pci_endpoint_test.ko for KVER from Debian's packaged source and headers into
# OUT_DIR/epf (kept: a later run reuses it); prints its path.
build_epf_module() {
    local cached=$OUT_DIR/epf/pci_endpoint_test-$KVER.ko
    if [ -s "$cached" ]; then
        say "already built: $cached" >&2
        printf '%s\n' "$cached"
        return
    fi
    local headers=linux-headers-$KVER common kbuild source cc deb
    common=$(apt-cache depends "$headers" 2>/dev/null | sed -n 's/^ *Depends: \(linux-headers-[^ ]*-common\)$/\1/p' | head -n1)
    kbuild=$(apt-cache depends "$headers" 2>/dev/null | sed -n 's/^ *Depends: \(linux-kbuild-[^ ]*\)$/\1/p' | head -n1)
    if [ -z "$common" ] || [ -z "$kbuild" ]; then
        die "cannot resolve the dependencies of $headers (apt-cache depends $headers)"
    fi
    source=linux-source-${kbuild#linux-kbuild-}
    local hdr=$WORK/headers
    command -v xz >/dev/null || die "xz not found: apt-get install xz-utils"
    local provenance=() pkg
    for pkg in "$headers" "$common" "$kbuild" "$source"; do
        deb=$(fetch "$pkg") || die "$(epf_download_hint "$pkg")"
        provenance+=("$(deb_line "$deb")")
        [ "$(dpkg-deb -f "$deb" Version)" = "$(dpkg-deb -f "$kernel_deb" Version)" ] ||
            say "warning: $(basename "$deb") is not version $(dpkg-deb -f "$kernel_deb" Version) of the kernel" >&2
        case "$deb" in
        */linux-source-*)
            say "extracting drivers/misc/pci_endpoint_test.c from $(basename "$deb")" >&2
            mkdir -p "$WORK/epf"
            dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' |
                xz -dc | tar -x -C "$WORK/epf" --strip-components=3 --wildcards '*/drivers/misc/pci_endpoint_test.c'
            [ -f "$WORK/epf/pci_endpoint_test.c" ] || die "pci_endpoint_test.c not found in $(basename "$deb")" ;;
        *) dpkg-deb -x "$deb" "$hdr" ;;
        esac
    done
    local kdir=$hdr/usr/src/$headers
    # The headers' Makefile includes the common tree by its absolute /usr/src path: point it here.
    printf 'include %s\n' "$hdr/usr/src/$common/Makefile" >"$kdir/Makefile"
    cc=$(sed -n 's/^CC = .*(CROSS_COMPILE)\(gcc-[0-9]*\).*/\1/p' "$kdir/.kernelvariables" | head -n1)
    cc=${cc:-gcc}
    command -v make >/dev/null || die "make not found: apt-get install make"
    command -v "$cc" >/dev/null || die "$cc (the compiler $KVER was built with) not found: apt-get install $cc"
    printf 'obj-m := pci_endpoint_test.o\n' >"$WORK/epf/Kbuild"
    say "building pci_endpoint_test.ko for $KVER with $cc" >&2
    make -s -C "$kdir" M="$WORK/epf" modules >"$WORK/epf/build.log" 2>&1 ||
        { cat "$WORK/epf/build.log" >&2; die "building pci_endpoint_test.ko failed"; }
    mkdir -p "$OUT_DIR/epf"
    if command -v strip >/dev/null; then
        strip --strip-debug -o "$cached.tmp" "$WORK/epf/pci_endpoint_test.ko"
    else
        cp "$WORK/epf/pci_endpoint_test.ko" "$cached.tmp"
    fi
    mv "$cached.tmp" "$cached"
    printf '%s\n' "${provenance[@]}" >"$cached.packages"
    printf '%s\n' "$cached"
}

# pci_endpoint_test: from the kernel package if it has it, else from EPF_MODULE, else built when
# BUILD_EPF_MODULE=1.
module_src=$(find "$MODULES_DIR" -name 'pci_endpoint_test.ko*' -print -quit)
if [ -z "$module_src" ] && [ -n "${EPF_MODULE:-}" ]; then
    [ -f "$EPF_MODULE" ] || die "EPF_MODULE=$EPF_MODULE is not a file"
    module_src=$EPF_MODULE
fi
if [ -z "$module_src" ] && [ "${BUILD_EPF_MODULE:-0}" = 1 ]; then
    module_src=$(build_epf_module)
fi
if [ -n "$module_src" ]; then
    case "$module_src" in
    # Decompress here: whether busybox's insmod reads compressed modules depends on its build.
    *.ko.xz)
        command -v xz >/dev/null || die "$module_src is xz-compressed and xz is missing (apt-get install xz-utils)"
        xz -dc "$module_src" >"$ROOT/lib/modules/pci_endpoint_test.ko" ;;
    *.ko.zst)
        command -v zstd >/dev/null || die "$module_src is zstd-compressed and zstd is missing (apt-get install zstd)"
        zstd -qdc "$module_src" >"$ROOT/lib/modules/pci_endpoint_test.ko" ;;
    *.ko.gz) gzip -dc "$module_src" >"$ROOT/lib/modules/pci_endpoint_test.ko" ;;
    *.ko) cp "$module_src" "$ROOT/lib/modules/pci_endpoint_test.ko" ;;
    *) die "unexpected module file $module_src" ;;
    esac
    say "pci_endpoint_test: included ($module_src)"
else
    say "pci_endpoint_test: not in $KERNEL_PACKAGE (CONFIG_PCI_ENDPOINT_TEST not set); not included (BUILD_EPF_MODULE=1 builds it)"
fi

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# /init of the VMM's Linux test guest (written by resources/linux/make-guest.sh).
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# outb PORT VALUE: one byte to an I/O port, through /bin/outb (reads port lo, port hi, value).
outb() {
    printf "\\$(printf %03o $(($1 & 255)))\\$(printf %03o $(($1 >> 8)))\\$(printf %03o $(($2)))" | /bin/outb
}

echo "vmm-guest: userspace ready"
# Boot-marks port: 0x01 = ready (the VMM timestamps it).
outb 0x440 1 || echo "vmm-guest: could not write the ready mark to port 0x440"
echo "vmm-guest: kernel $(uname -r); cmdline: $(cat /proc/cmdline)"

# PCI functions: address vendor:device class irq.
for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev/vendor" ] || continue
    echo "vmm-guest: pci ${dev##*/} $(cat "$dev/vendor"):$(cat "$dev/device") class $(cat "$dev/class") irq $(cat "$dev/irq")"
done

# Options from the kernel command line (the kernel leaves dotted words it doesn't know alone):
#   vmm_guest.epf_irq_type=N      insmod pci_endpoint_test irq_type=N (0 INTx, 1 MSI, 2 MSI-X);
#                                 the driver's own ID table forces MSI for its known IDs
#   vmm_guest.epf_id=VVVV:DDDD    also bind the driver to this vendor:device (new_id)
epf_args=
epf_id=
for word in $(cat /proc/cmdline); do
    case "$word" in
    vmm_guest.epf_irq_type=*) epf_args="irq_type=${word#*=}" ;;
    vmm_guest.epf_id=*) epf_id=${word#*=} ;;
    esac
done

if [ -f /lib/modules/pci_endpoint_test.ko ]; then
    # $epf_args unquoted: empty means no parameter at all.
    if insmod /lib/modules/pci_endpoint_test.ko $epf_args; then
        echo "vmm-guest: pci_endpoint_test loaded $epf_args"
    else
        echo "vmm-guest: insmod pci_endpoint_test failed"
    fi
    if [ -n "$epf_id" ] && [ -d /sys/bus/pci/drivers/pci-endpoint-test ]; then
        echo "${epf_id%%:*} ${epf_id#*:}" >/sys/bus/pci/drivers/pci-endpoint-test/new_id ||
            echo "vmm-guest: could not add $epf_id to pci-endpoint-test"
    fi
    # The driver binds to pci-epf-test functions; each gets /dev/pci-endpoint-test.N.
    set -- /dev/pci-endpoint-test.*
    if [ -e "$1" ]; then
        ls -l /dev/pci-endpoint-test.*
    else
        echo "vmm-guest: no /dev/pci-endpoint-test.* (no pci-epf-test device bound)"
    fi
else
    echo "vmm-guest: pci_endpoint_test module not in this initramfs"
fi

echo "vmm-guest: done"
# Debug-exit port: the VMM stops with this status (QEMU's isa-debug-exit exits with 2*status+1).
outb 0xf4 0 || echo "vmm-guest: could not write the exit status to port 0xf4"
poweroff -f
EOF
chmod 755 "$ROOT/init"

# --- cpio (newc, uncompressed: gunzip costs about a minute under emulated KVM) -------------------
# Fixed owners and times so that the same packages give the same archive.
find "$ROOT" -exec touch -h -d @0 {} +
if [ "$CPIO_WITH" = cpio ]; then
    (cd "$ROOT" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio --quiet -o -H newc --owner=0:0 --reproducible) >"$OUT_DIR/initramfs.cpio.tmp"
else
    python3 - "$ROOT" "$OUT_DIR/initramfs.cpio.tmp" <<'EOF'
import os, stat, sys
root, out = sys.argv[1], sys.argv[2]
names = []
for top, dirs, files in os.walk(root):
    for n in dirs + files:
        names.append(os.path.relpath(os.path.join(top, n), root))
names.sort(key=lambda s: s.encode())

def entry(f, ino, name, mode, nlink, data):
    name_b = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
    hdr = b"070701" + b"".join(b"%08x" % v for v in fields)
    f.write(hdr + name_b + b"\0" * (-(len(hdr) + len(name_b)) % 4))
    f.write(data + b"\0" * (-len(data) % 4))

with open(out, "wb") as f:
    for ino, name in enumerate(names, 1):
        path = os.path.join(root, name)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            data, nlink = os.readlink(path).encode(), 1
        elif stat.S_ISDIR(st.st_mode):
            data, nlink = b"", st.st_nlink
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as src:
                data = src.read()
            nlink = 1
        else:
            sys.exit("make-guest: unexpected file type: " + name)
        entry(f, ino, name, st.st_mode, nlink, data)
    entry(f, 0, "TRAILER!!!", 0, 1, b"")
EOF
fi
mv "$OUT_DIR/initramfs.cpio.tmp" "$OUT_DIR/initramfs.cpio"

# --- command line ------------------------------------------------------------------------------
# console=ttyS0            kernel messages and /dev/console on the 16550 at 0x3f8
# earlyprintk=ttyS0        print from early boot on, before the 8250 driver registers (under
#                          emulated KVM the banner is all there is to see)
# reboot=k                 reboot by pulsing the i8042 reset line (0xfe to port 0x64): the VMM
#                          stops; no ACPI/EFI/BIOS reboot methods exist in this VMM
# panic=-1                 on a panic, reboot at once (so the VMM exits instead of hanging)
# pci=conf1                PCI configuration through ports 0xcf8/0xcfc only: no PCI BIOS, no MMCONFIG
# 8250.nr_uarts=1          register only ttyS0; the VMM has no other UART
# i8042.noaux i8042.nomux  the VMM's i8042 has no mouse (AUX) port and no multiplexer: don't probe
# i8042.nopnp              no PNP/ACPI to describe the i8042: use the legacy ports directly
# i8042.dumbkbd            don't send keyboard commands (LEDs, reset) the minimal i8042 won't answer
# tsc=reliable             trust the TSC: no clocksource watchdog that an emulated, slow guest
#                          could trip into marking it unstable
# no_timer_check           skip the IO-APIC timer check, which times a busy loop and can fail
#                          when the guest runs slowly
# rdinit=/init             run the initramfs' /init (the default, spelled out)
# Deliberately NOT acpi=off: Debian's cloud kernel is built without CONFIG_X86_MPPARSE, and with
# acpi=off such a kernel clears the CPU's APIC feature ("MPS support code is not built-in") and
# runs without a local APIC, so PCI MSI/MSI-X cannot work. Without acpi=off it takes the CPUs and
# the IO-APIC from the VMM's ACPI MADT. It never reads the VMM's MP table; the generic kernel
# (KERNEL_META=linux-image-amd64) can.
CMDLINE="console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 pci=conf1 8250.nr_uarts=1"
CMDLINE+=" i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check rdinit=/init"
printf '%s\n' "$CMDLINE" >"$OUT_DIR/cmdline"

# --- manifest and summary --------------------------------------------------------------------
{
    deb_line "$kernel_deb"
    deb_line "$busybox_deb"
    # A module built by BUILD_EPF_MODULE=1 records the packages it came from.
    [ -n "$module_src" ] && [ -f "$module_src.packages" ] && cat "$module_src.packages"
    [ -n "$module_src" ] && printf 'pci_endpoint_test %s\n' "$module_src"
    printf 'kernel-release %s\n' "$KVER"
    printf 'cpio-writer %s\n' "$CPIO_WITH"
} >"$OUT_DIR/packages.txt"

say "done ($KERNEL_PACKAGE $(dpkg-deb -f "$kernel_deb" Version), $BUSYBOX_PACKAGE $(dpkg-deb -f "$busybox_deb" Version)):"
for f in vmlinuz vmlinux initramfs.cpio cmdline packages.txt; do
    printf '  %-40s %10s bytes\n' "$OUT_DIR/$f" "$(stat -c %s "$OUT_DIR/$f")"
done
say "boot: vmm run --kernel $OUT_DIR/vmlinuz --initrd $OUT_DIR/initramfs.cpio --cmdline \"\$(cat $OUT_DIR/cmdline)\""
say "  or: vmm run --kernel $OUT_DIR/vmlinux --boot-protocol pvh --initrd ... (same arguments; no decompressor to run)"
