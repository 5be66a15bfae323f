#!/bin/sh
# find-requires for `cargo xtask rpm --target <another arch>`: cargo-generate-rpm's builtin
# mode asks ldd, which cannot read a foreign binary. rpm's own ELF reader (what rpmbuild uses)
# reads the file names on stdin and prints their library and symbol version requirements.
exec /usr/lib/rpm/elfdeps --requires
