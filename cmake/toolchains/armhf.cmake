# 32-bit Arm, hard float, ARMv7 (Debian armhf): scripts/build-agent-cross.sh armhf
set(CMAKE_SYSTEM_PROCESSOR armv7l)
set(FLOTILLA_CROSS_ARCH armhf)
set(FLOTILLA_CROSS_TRIPLET arm-linux-gnueabihf)
include(${CMAKE_CURRENT_LIST_DIR}/debian-cross.cmake)
