# flotilla_deb_version(OUT VERSION): the Debian version for a Flotilla
# version string. `git describe` output has '-' ("0.1.0+git.5349064-dirty"),
# which Debian reserves for the revision of non-native packages; these are
# native packages, so '-' becomes '.' and nothing else changes.
function(flotilla_deb_version out version)
  string(REPLACE "-" "." v "${version}")
  if(NOT v MATCHES "^[0-9][A-Za-z0-9.+~]*$")
    message(FATAL_ERROR "'${version}' does not make a Debian version")
  endif()
  set(${out} "${v}" PARENT_SCOPE)
endfunction()
