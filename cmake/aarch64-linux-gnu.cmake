# Cross toolchain for aarch64 Linux with Debian's g++-aarch64-linux-gnu, running the built
# binaries (ctest) under qemu-aarch64 (Debian qemu-user) with the cross sysroot's loader and libs.
# Usage: cmake -S . -B build-neon -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(QLORA_CROSS_PREFIX aarch64-linux-gnu)
set(QLORA_CROSS_SYSROOT /usr/${QLORA_CROSS_PREFIX})
set(CMAKE_C_COMPILER ${QLORA_CROSS_PREFIX}-gcc)
set(CMAKE_CXX_COMPILER ${QLORA_CROSS_PREFIX}-g++)

# Libraries and headers come only from the cross sysroot, never from the host's /usr/lib or
# /usr/include (host x86 headers would compile but link or behave wrongly). Programs (the
# compilers, the emulator) still come from the host.
set(CMAKE_FIND_ROOT_PATH ${QLORA_CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# -L points qemu at the sysroot's dynamic loader and shared libraries, so dynamically linked
# test binaries run without binfmt_misc registration or a static link.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;${QLORA_CROSS_SYSROOT})
