#!/usr/bin/env python3
"""Machine code (SASS) of the WGSL kernels as NVIDIA's Vulkan driver compiled them.

The driver offers no internal representation through VK_KHR_pipeline_executable_properties
(`nabla info --kernel-stats --ir-dir` reports none), but it keeps every pipeline it compiles in
its shader disk cache. This reads the compiled code out of that cache and disassembles it:

    export __GL_SHADER_DISK_CACHE_PATH=/tmp/sass-cache __GL_SHADER_DISK_CACHE_SKIP_CLEANUP=1
    rm -rf /tmp/sass-cache && mkdir -p /tmp/sass-cache
    nabla info --kernel-stats 'linalg/linear[bf16,none,x_f16][coop,sg32,vec8,tm128]'
    python3 tools/nvidia-sass/sass.py /tmp/sass-cache out/linear

Start from an empty cache directory so that it holds only the kernels of one command (the
driver adds two small internal programs of its own: 896 and 1920 bytes of code). Each program
found is written to PREFIX_N.sass. Needs nvdisasm (CUDA toolkit; NVDISASM or
/usr/local/cuda/bin) and zstd (the `zstandard` module or the `zstd` command; ZSTD names it).

The cache format is not documented; what this reads was worked out on driver 580.159.04
(H200, 2026-11-30): each cache file holds zstd frames, each preceded by its compressed and
decompressed sizes (two little-endian u32); a decompressed frame that holds a program starts
with b"NVDANVVMNVuc", and the u32 at +0x4c is the code's size, the one at +0x50 its offset
from +8. Anything else is reported and skipped, never guessed at.

Each instruction line also gets its scheduling control bits, decoded from the code (bits 105-125
of each 128-bit instruction, the layout from Volta on): `S` stall cycles, `Y` yield, `W`n the
scoreboard its result sets (variable-latency ops: loads, LDSM), `R`n the scoreboard that frees
its source registers, and `wait` the scoreboards it waits for (0-5). A consumer waiting on a
scoreboard that later loads share waits for those loads too.
"""
import os
import re
import shutil
import struct
import subprocess
import sys

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PROGRAM = b"NVDANVVMNVuc"


def decompress(frame, size):
    """The frame's `size` decompressed bytes (b"" if they do not come out whole)."""
    try:
        import zstandard
        out = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
    except ImportError:
        zstd = os.environ.get("ZSTD") or shutil.which("zstd")
        if not zstd:
            sys.exit("sass.py: needs the zstandard module or the zstd command (ZSTD=path)")
        # (the command complains about the bytes after a frame but writes the frame whole)
        out = subprocess.run([zstd, "-d", "-c", "-q"], input=frame, capture_output=True).stdout
    return out if len(out) == size else b""


def control(code, addr):
    """The scheduling control bits of the instruction at byte offset `addr`, as text."""
    c = (int.from_bytes(code[addr:addr + 16], "little") >> 105) & ((1 << 21) - 1)
    stall, yld, wb, rb, wait = c & 0xF, (c >> 4) & 1, (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 0x3F
    waits = "".join(str(i) if wait >> i & 1 else "-" for i in range(6))
    return (f"S{stall:02d} {'Y' if yld else '-'} W{wb if wb != 7 else '-'} "
            f"R{rb if rb != 7 else '-'} wait:{waits}")


def annotate(listing, code):
    """The listing with each instruction's control bits appended (`/*addr*/` = byte offset)."""
    out = []
    for line in listing.split("\n"):
        m = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if m and int(m.group(1), 16) + 16 <= len(code):
            line = f"{line:<90} // {control(code, int(m.group(1), 16))}"
        out.append(line)
    return "\n".join(out)


def programs(data):
    """(code) of every program in one cache file."""
    i = data.find(ZSTD_MAGIC)
    while i >= 8:
        csize, dsize = struct.unpack_from("<II", data, i - 8)
        raw = decompress(data[i:i + csize], dsize)
        j = raw.find(PROGRAM)
        while j >= 0:
            size, off = struct.unpack_from("<II", raw, j + 0x4C)
            code = raw[j + 8 + off:j + 8 + off + size]
            if len(code) != size or size % 16 != 0:
                print(f"  skipped a program at {j}: code size {size}, offset {off} do not fit")
            else:
                yield code
            j = raw.find(PROGRAM, j + 1)
        i = data.find(ZSTD_MAGIC, i + max(csize, 4))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    cache, prefix = sys.argv[1], sys.argv[2]
    nvdisasm = os.environ.get("NVDISASM") or shutil.which("nvdisasm") or "/usr/local/cuda/bin/nvdisasm"
    if not os.path.exists(nvdisasm):
        sys.exit(f"sass.py: nvdisasm not found ({nvdisasm}); set NVDISASM")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    n = 0
    for root, _, files in sorted(os.walk(cache)):
        for f in sorted(files):
            if not f.endswith(".bin"):
                continue
            for code in programs(open(os.path.join(root, f), "rb").read()):
                path = f"{prefix}_{n}"
                with open(path + ".code", "wb") as out:
                    out.write(code)
                r = subprocess.run([nvdisasm, "-b", "SM90", path + ".code"], capture_output=True, text=True)
                with open(path + ".sass", "w") as out:
                    out.write(annotate(r.stdout, code) + r.stderr)
                os.remove(path + ".code")
                print(f"{path}.sass: {len(code)} bytes of code, {r.stdout.count(chr(10))} lines")
                n += 1
    if n == 0:
        sys.exit(f"sass.py: no program found under {cache} (was __GL_SHADER_DISK_CACHE_PATH set?)")


if __name__ == "__main__":
    main()
