#!/usr/bin/env python3
"""Writes the hand-made inputs of tests/fuzz_regressions/ (golden images with flipped bytes,
small NBD sessions). Crashing inputs found by the fuzzers are added there by hand after
`cargo fuzz tmin`; this script only (re)creates the hand-made ones.

Input formats are those of tools/fuzz/src/harness: image_open = image ++ ops ++ u16 LE ops
length ++ mode (bit 0 fixes header CRCs, bit 1 map sector CRCs) ++ "OP"."""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "tests", "fuzz_regressions")
GOLDEN = open(os.path.join(ROOT, "tests", "golden", "standalone-4k.cow"), "rb").read()
SLOT1 = 4096          # the current header (generation 3) of standalone-4k.cow
SECTOR = 8192         # its first map sector; entries of 32 bytes from SECTOR + 16


def join(image, ops=b"", mode=0):
    return bytes(image) + ops + struct.pack("<H", len(ops)) + bytes([mode]) + b"OP"


def ops_tour():
    v = b""
    for op in range(8):
        v += bytes([op, (op * 37) & 0xFF]) + struct.pack("<QII", op * 5000 + 123, op * 3000 + 7, op)
    return v


def save(target, name, data):
    with open(os.path.join(OUT, target, name), "wb") as f:
        f.write(data)


def patched(changes):
    b = bytearray(GOLDEN)
    for off, fmt, val in changes:
        struct.pack_into(fmt, b, off, val)
    return b


# Header slot 1 torn (bad CRC): falls back to slot 0.
b = bytearray(GOLDEN)
b[SLOT1 + 100] ^= 0xFF
save("image_open", "golden-4k-slot1-torn", join(b, ops_tour(), 0))
# Virtual size shrunk under the map (CRC fixed): chunk 1's entry lies past the end.
save("image_open", "golden-4k-size-512-crc-fixed", join(patched([(SLOT1 + 40, "<Q", 512)]), ops_tour(), 1))
# Virtual size 2^60 (CRC fixed).
save("image_open", "golden-4k-size-huge-crc-fixed", join(patched([(SLOT1 + 40, "<Q", 1 << 60)]), ops_tour(), 1))
# Two chunks sharing one data slot (map CRC fixed).
save("image_open", "golden-4k-shared-slot", join(patched([(SECTOR + 48 + 16, "<Q", 73728)]), ops_tour(), 3))
# Chunk number past the end of the disk (map CRC fixed).
save("image_open", "golden-4k-chunk-past-end", join(patched([(SECTOR + 16 + 8, "<Q", 1 << 40)]), b"", 3))
# Map sector torn (bad CRC, not fixed).
b = bytearray(GOLDEN)
b[SECTOR + 30] ^= 0x01
save("image_open", "golden-4k-map-sector-torn", join(b, b"", 0))
# Data and zero bit both set for one block (map CRC fixed).
save("image_open", "golden-4k-data-and-zero-bits", join(patched([(SECTOR + 16 + 28, "<I", 1)]), ops_tour(), 3))
# Map extent pointing at the data slots (CRC fixed).
save("image_open", "golden-4k-map-extent-over-data", join(patched([(SLOT1 + 120, "<Q", 73728)]), b"", 1))
# Only the two header slots: the map and the data are cut off.
save("image_open", "golden-4k-truncated-after-header", join(GOLDEN[:8192], ops_tour(), 0))


# NBD client streams.
IHAVEOPT = 0x49484156454F5054


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def req(flags, typ, cookie, offset, length, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, offset, length) + payload


def name_req(o, name, infos=()):
    return opt(o, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))


flags = struct.pack(">I", 3)
# A huge option length is refused before anything is allocated.
save("nbd_server", "option-length-4g", flags + struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFFF))
# Export-name with an unknown export: the server closes.
save("nbd_server", "export-name-unknown", flags + opt(1, b"nope"))
# GO, then reads and writes at the edges of u64 offsets, a 4 GiB read and block status without a context.
s = flags + name_req(7, b"disk")
s += req(0, 0, 1, 0xFFFFFFFFFFFFF000, 0x2000)
s += req(0, 0, 2, 0, 0xFFFFFFFF)
s += req(0, 7, 3, 0, 4096)
s += req(0, 1, 4, (1 << 20) - 1, 2, b"ab")
s += req(0, 4, 5, 0, 0xFFFFFFFF)
s += req(0, 6, 6, 1 << 20, 0)
s += req(0xFFFF, 0, 7, 0, 1)
s += req(0, 2, 8, 0, 0)
save("nbd_server", "go-edge-requests", s)
# Structured replies, base:allocation, and a block status over the whole disk with REQ_ONE.
meta = struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 15) + b"base:allocation"
s = flags + opt(8) + opt(10, meta) + name_req(7, b"disk")
s += req(8, 7, 1, 0, 1 << 20) + req(0, 7, 2, 4095, 1) + req(0, 0, 3, 60000, 200000) + req(0, 2, 4, 0, 0)
save("nbd_server", "structured-block-status", s + b"\0")  # odd length: two threads


def xreq(flags, typ, cookie, offset, length, payload=b""):
    """An extended request (NBD_OPT_EXTENDED_HEADERS): 32 bytes, a 64-bit length."""
    return struct.pack(">IHHQQQ", 0x21E41C71, flags, typ, cookie, offset, length) + payload


# Extended headers, base:allocation, then: block status and a trim with 64-bit lengths (the
# whole disk, and far past it), a write without and one with PAYLOAD_LEN, a read across them,
# a trim carrying a payload (read and refused), a zero-length read, a zeroing past the end, a
# block status with REQ_ONE. Even length: one thread, every reply checked.
s = flags + opt(11) + opt(10, meta) + name_req(7, b"disk")
s += xreq(0, 7, 1, 0, 1 << 40) + xreq(0, 7, 2, 0, 4 << 20) + xreq(0, 4, 3, 0, 1 << 40) + xreq(0, 4, 4, 1 << 20, 1 << 20)
s += xreq(0, 1, 5, 4096, 8, b"abcdefgh") + xreq(32, 1, 6, 8192, 4, b"wxyz") + xreq(0, 0, 7, 0, 3 << 16)
s += xreq(32, 4, 8, 0, 6, b"junk!!") + xreq(0, 0, 9, 512, 0) + xreq(0, 6, 10, 1 << 41, 1 << 12)
s += xreq(8, 7, 11, 4096, 1 << 33) + xreq(0, 2, 12, 0, 0)
s += b"\0" * (len(s) % 2)  # the server reads nothing after NBD_CMD_DISC
save("nbd_server", "extended-headers", s)
# The same, then a compact request where extended ones were agreed: the server stops reading.
t = s[: s.index(xreq(0, 2, 12, 0, 0))] + req(0, 0, 13, 0, 512)
save("nbd_server", "extended-then-compact", t + b"\0" * (len(t) % 2))

# image_ops: a few operation sequences (setup bytes, then ops).
for i, setup in enumerate([b"\x13\x06\x03", b"\x25\x00\x00", b"\x04\x04\x07"]):
    body = bytes((j * 73 + i * 11) & 0xFF for j in range(300))
    save("image_ops", "sequence-%d" % i, setup + body)
