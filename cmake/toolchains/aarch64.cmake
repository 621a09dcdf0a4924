# 64-bit Arm (Debian arm64): scripts/build-agent-cross.sh aarch64
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(FLOTILLA_CROSS_ARCH aarch64)
set(FLOTILLA_CROSS_TRIPLET aarch64-linux-gnu)
include(${CMAKE_CURRENT_LIST_DIR}/debian-cross.cmake)
