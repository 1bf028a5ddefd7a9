# cross's aarch64 image, pinned (Ubuntu 16.04, glibc 2.23; see Cross.toml), plus one define for
# ring: its AArch64 assembly (aesv8-armx, …) refuses to build unless __ARM_ARCH is defined, and
# old aarch64 GCCs leave it undefined for assembler sources
# (https://github.com/briansmith/ring/issues/1728, seen with GCC 4.8). This image has GCC 5.4;
# without a docker engine on the development machines it could not be tried, so the define
# is set to the value newer GCCs define themselves: harmless if GCC 5.4 does the same.
FROM ghcr.io/cross-rs/aarch64-unknown-linux-gnu:0.2.5
ENV CFLAGS_aarch64_unknown_linux_gnu="-D__ARM_ARCH=8"
