#!/usr/bin/env python3
"""Builds the kit that puts the Linux kernel's own NBD client in front of cowdisk: a Debian
kernel, and an initramfs holding busybox, Debian's nbd-client and the kernel modules the guest
needs (virtio-net to reach the host, nbd, ext4). tools/tests/kernel_client.rs boots it in
qemu-system-x86_64 (TCG: this machine's nested KVM does not boot a kernel), with the test's
scenario appended as a second cpio archive. This machine has no nbd module of its own, so a
guest is the only way to run the kernel client here.

Usage: tools/kernel-client/build.py OUTDIR
       tools/kernel-client/build.py --pack DIR OUT.cpio.gz   (a gzip'ed cpio of DIR: the
       scenario archive a test appends to the initramfs)
Writes OUTDIR/vmlinuz and OUTDIR/initrd.cpio.gz; does nothing when they are there and were made
by this version of this script and of `init`. Downloads the .deb files with `apt-get download`
(nothing is installed on the host).
"""
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The guest's modules, in load order once their dependencies are added: the PCI transport and
# the network device (the guest reaches the server through qemu's user-mode network), the
# NBD client, and ext4 with the checksum it needs for metadata_csum (ext4 asks the crypto API
# for "crc32c", which would otherwise need a modprobe with aliases in the guest).
MODULES = ["virtio_pci", "virtio_net", "nbd", "crc32c_generic", "ext4"]
PACKAGES = ["nbd-client", "busybox-static", "libnl-genl-3-200"]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def kernel_package():
    """The versioned package linux-image-amd64 depends on (its kernel)."""
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise SystemExit("apt-cache depends linux-image-amd64 names no kernel package")


def download(names, into):
    into.mkdir(parents=True, exist_ok=True)
    # apt drops to the _apt user to download; a directory it may write spares a warning.
    os.chmod(into, 0o777)
    for attempt in (1, 2):
        r = subprocess.run(["apt-get", "download", *names], cwd=into, capture_output=True, text=True)
        if r.returncode == 0:
            return
        if attempt == 1:
            run(["apt-get", "update", "-qq"])
    raise SystemExit(f"apt-get download {' '.join(names)} failed:\n{r.stderr}")


def module_index(kroot):
    """Module name -> path of its .ko, and the names each depends on (its .modinfo section's
    `depends=`, which is what depmod reads; this host has no depmod)."""
    paths = {}
    for ko in kroot.rglob("*.ko"):
        paths[ko.stem.replace("-", "_")] = ko
    return paths


def depends(ko):
    m = re.search(rb"depends=([^\x00]*)\x00", ko.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def load_order(paths, wanted):
    order = []

    def visit(name):
        if name in order:
            return
        if name not in paths:
            raise SystemExit(f"kernel module {name} not found")
        for d in depends(paths[name]):
            visit(d)
        order.append(name)

    for w in wanted:
        visit(w)
    return order


def shared_libs(binary, extra_lib_dirs):
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(map(str, extra_lib_dirs)))
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True, env=env).stdout
    libs = []
    for line in out.splitlines():
        if "not found" in line:
            raise SystemExit(f"{binary}: {line.strip()}")
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def cpio_newc(root, out):
    """A gzip'ed cpio archive (newc) of the tree at `root`, written by hand: this host has no
    cpio, and the format is a fixed 110-byte header per entry."""
    entries = sorted(p for p in root.rglob("*"))
    with gzip.open(out, "wb", compresslevel=1) as f:
        ino = 1

        def put(name, st, data):
            nonlocal ino
            hdr = "070701" + "".join(
                f"{v:08x}"
                for v in (ino, st.st_mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
            )
            ino += 1
            blob = hdr.encode() + name.encode() + b"\x00"
            f.write(blob + b"\x00" * (-len(blob) % 4))
            f.write(data + b"\x00" * (-len(data) % 4))

        for p in entries:
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                put(rel, st, os.readlink(p).encode())
            elif p.is_dir():
                put(rel, st, b"")
            else:
                put(rel, st, p.read_bytes())
        put("TRAILER!!!", os.stat_result((0,) * 10), b"")


def stamp():
    h = hashlib.sha256()
    for f in (Path(__file__), HERE / "init"):
        h.update(f.read_bytes())
    return h.hexdigest()


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--pack":
        cpio_newc(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Tests build the kit at once from several processes: one builds, the others wait for it.
    lock = open(out / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    want = stamp()
    done = out / "stamp"
    if done.exists() and done.read_text() == want and (out / "vmlinuz").exists() and (out / "initrd.cpio.gz").exists():
        return
    debs, tree, root = out / "debs", out / "extracted", out / "initramfs"
    for d in (tree, root):
        shutil.rmtree(d, ignore_errors=True)
    kpkg = kernel_package()
    have = {p.name.split("_")[0] for p in debs.glob("*.deb")} if debs.exists() else set()
    need = [p for p in [kpkg, *PACKAGES] if p not in have]
    if need:
        download(need, debs)
    for deb in debs.glob("*.deb"):
        if deb.name.split("_")[0] in [kpkg, *PACKAGES]:
            run(["dpkg-deb", "-x", str(deb), str(tree)])
    kver = kpkg.removeprefix("linux-image-")
    shutil.copy(tree / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")

    for d in ("bin", "sbin", "dev", "proc", "sys", "mnt", "lib64", "lib/x86_64-linux-gnu", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(tree / "bin" / "busybox", root / "bin" / "busybox")
    shutil.copy(tree / "sbin" / "nbd-client", root / "sbin" / "nbd-client")
    # libnl-genl is not on the host: ldd finds it where its package was extracted.
    extracted_libs = [tree / "lib" / "x86_64-linux-gnu", tree / "usr" / "lib" / "x86_64-linux-gnu"]
    for lib in shared_libs(tree / "sbin" / "nbd-client", extracted_libs):
        dest = root / ("lib64" if lib.name.startswith("ld-linux") else "lib/x86_64-linux-gnu") / lib.name
        shutil.copy(lib.resolve(), dest)
    paths = module_index(tree / "lib" / "modules" / kver / "kernel")
    order = load_order(paths, MODULES)
    for name in order:
        shutil.copy(paths[name], root / "lib" / "modules" / f"{name}.ko")
    (root / "lib" / "modules" / "order").write_text("".join(f"{n}\n" for n in order))
    shutil.copy(HERE / "init", root / "init")
    os.chmod(root / "init", 0o755)
    cpio_newc(root, out / "initrd.cpio.gz")
    # The extracted kernel's modules take some 400 MB; the .deb files stay for a rebuild.
    for d in (tree, root):
        shutil.rmtree(d)
    done.write_text(want)


if __name__ == "__main__":
    main()
