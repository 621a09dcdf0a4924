# Writes OUT.gz, a one-entry Debian changelog for PACKAGE at the version in
# VERSION_TXT, dated by the last commit (reproducible; 1970 outside Git).
#   cmake -DVERSION_TXT=... -DPACKAGE=... -DMAINTAINER=... -DSOURCE_DIR=... -DOUT=... -P make_changelog.cmake
include(${CMAKE_CURRENT_LIST_DIR}/deb_version.cmake)
file(STRINGS "${VERSION_TXT}" version LIMIT_COUNT 1)
flotilla_deb_version(deb "${version}")
set(date "Thu, 01 Jan 1970 00:00:00 +0000")
find_program(GIT git)
if(GIT)
  execute_process(COMMAND "${GIT}" -C "${SOURCE_DIR}" log -1 --format=%cD OUTPUT_VARIABLE d
                  OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE rc)
  if(rc EQUAL 0 AND NOT d STREQUAL "")
    set(date "${d}")
  endif()
endif()
get_filename_component(dir "${OUT}" DIRECTORY)
file(MAKE_DIRECTORY "${dir}")
file(WRITE "${OUT}" "${PACKAGE} (${deb}) unstable; urgency=medium\n\n"
  "  * Built from the Flotilla source tree at ${version}.\n\n"
  " -- ${MAINTAINER}  ${date}\n")
execute_process(COMMAND gzip -9nf "${OUT}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "gzip ${OUT} failed")
endif()
