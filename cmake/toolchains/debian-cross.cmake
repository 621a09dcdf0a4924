# Shared part of the cross toolchain files (aarch64.cmake, armhf.cmake):
# Debian's cross compilers (gcc-<triplet>, which bring glibc and libstdc++ for
# the target under /usr/<triplet>) plus a sysroot of the target's -dev
# packages that scripts/build-agent-cross.sh unpacks from the Debian archive.
#
# Why a private sysroot instead of `dpkg --add-architecture` + apt-get install
# <pkg>:arm64: multiarch "Multi-Arch: same" packages must carry exactly the
# host's version, so any lag between the host's and the foreign architecture's
# indexes (a security update published for amd64 first, a mirror mid-sync)
# makes the install impossible, and it changes the machine's package state for
# everyone. Unpacked .debs have neither problem (docs/images.md, "Cross builds").
#
# Needs FLOTILLA_CROSS_TRIPLET set by the including file.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_C_COMPILER ${FLOTILLA_CROSS_TRIPLET}-gcc)
set(CMAKE_CXX_COMPILER ${FLOTILLA_CROSS_TRIPLET}-g++)
set(CMAKE_LIBRARY_ARCHITECTURE ${FLOTILLA_CROSS_TRIPLET})

if(DEFINED ENV{FLOTILLA_CROSS_SYSROOT})
  set(FLOTILLA_CROSS_SYSROOT $ENV{FLOTILLA_CROSS_SYSROOT})
else()
  get_filename_component(FLOTILLA_CROSS_SYSROOT
    "${CMAKE_CURRENT_LIST_DIR}/../../build-${FLOTILLA_CROSS_ARCH}/sysroot" ABSOLUTE)
endif()
if(NOT EXISTS "${FLOTILLA_CROSS_SYSROOT}/usr/include")
  message(FATAL_ERROR "no target sysroot at ${FLOTILLA_CROSS_SYSROOT}: run scripts/build-agent-cross.sh ${FLOTILLA_CROSS_ARCH}")
endif()

# Target libraries, headers and CMake packages come from the sysroot (and the
# cross glibc); programs (protoc) from the host.
set(CMAKE_FIND_ROOT_PATH ${FLOTILLA_CROSS_SYSROOT} /usr/${FLOTILLA_CROSS_TRIPLET})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
# OpenSSL keeps its configuration.h under the multiarch include directory.
set(CMAKE_C_STANDARD_INCLUDE_DIRECTORIES ${FLOTILLA_CROSS_SYSROOT}/usr/include/${FLOTILLA_CROSS_TRIPLET})
set(CMAKE_CXX_STANDARD_INCLUDE_DIRECTORIES ${FLOTILLA_CROSS_SYSROOT}/usr/include/${FLOTILLA_CROSS_TRIPLET})
# The host protoc generates the code; the sysroot's libprotobuf-dev has the
# same version (both from Debian 12), which FindProtobuf checks.
set(Protobuf_PROTOC_EXECUTABLE /usr/bin/protoc CACHE FILEPATH "host protoc")
set(ENV{PKG_CONFIG_SYSROOT_DIR} ${FLOTILLA_CROSS_SYSROOT})
set(ENV{PKG_CONFIG_LIBDIR}
  "${FLOTILLA_CROSS_SYSROOT}/usr/lib/${FLOTILLA_CROSS_TRIPLET}/pkgconfig:${FLOTILLA_CROSS_SYSROOT}/usr/share/pkgconfig")
