#!/bin/sh
# Rebuild the raw test images from their sources (needs GNU as and ld).
# The images are committed, so the tests do not need an assembler.
set -e
cd "$(dirname "$0")"
build() { # name load-address
    as --64 -o "$1.o" "$1.S"
    ld -m elf_x86_64 -e "$2" -Ttext="$2" --oformat=binary -o "$1.bin" "$1.o"
    rm -f "$1.o"
}
build trampoline 0x10000
build lm 0x10000
build pm 0x20000
