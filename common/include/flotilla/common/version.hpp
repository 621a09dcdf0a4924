#pragma once
// Flotilla's version, one for every binary: the CMake project version, plus
// `git describe` when built from a Git checkout (cmake/write_version.cmake).

namespace flotilla {

const char* version();

}  // namespace flotilla
