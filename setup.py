"""Build the native helper and the micro-VM guest image.

The guest is freestanding C compiled here, at build time, so that nothing needs a
compiler at run time.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
GUEST_DIR = Path("tremus") / "domains" / "microvm" / "guest"
GUEST_CFLAGS = [
    "-std=gnu11", "-O2", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie",
    "-mno-red-zone", "-mgeneral-regs-only", "-fno-stack-protector", "-mcmodel=large",
    "-fno-asynchronous-unwind-tables", "-fno-builtin", "-Wall", "-Werror",
]


def build_guest(out_dir: Path) -> None:
    src = ROOT / GUEST_DIR
    cc = os.environ.get("TREMUS_GUEST_CC", "gcc")
    elf = out_dir / "guest.elf"
    sources = sorted(str(p) for p in src.glob("*.c"))
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.check_call(
        [cc, *GUEST_CFLAGS, "-static", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-T", str(src / "guest.ld"),
         "-o", str(elf), *sources]
    )
    subprocess.check_call(["objcopy", "-O", "binary", str(elf), str(out_dir / "guest.bin")])
    elf.unlink()


class BuildWithGuest(build_ext):
    def run(self) -> None:
        super().run()
        targets = {ROOT / GUEST_DIR}
        if not self.inplace:
            targets.add(Path(self.build_lib) / GUEST_DIR)
        for target in targets:
            build_guest(target)


native_sources = sorted(str(p) for p in (Path("tremus") / "native").glob("*.c"))

setup(
    ext_modules=[
        Extension(
            "tremus._native",
            sources=native_sources,
            depends=sorted(str(p) for p in (Path("tremus") / "native").glob("*.h")),
            extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-fno-strict-aliasing"],
            libraries=["xxhash"],  # hash64 is XXH3-64 (Debian: libxxhash-dev)
        )
    ],
    cmdclass={"build_ext": BuildWithGuest},
)
