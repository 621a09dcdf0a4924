# CPack: three Debian packages from the install components
# (docs/adr/0012-debian-packages-with-cpack.md). scripts/package.sh runs
# `cpack -G DEB` in a configured, built tree: the binaries are the ones the
# tests ran, nothing is rebuilt.

set(CPACK_PACKAGE_NAME flotilla)
set(CPACK_PACKAGE_VENDOR "Flotilla")
set(CPACK_PACKAGE_CONTACT "${FLOTILLA_DEB_MAINTAINER}")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_GENERATOR DEB)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL hub cli agent)
# Debian wants stripped binaries (the static agent is stripped already).
set(CPACK_STRIP_FILES ON)
set(CPACK_PACKAGE_DIRECTORY ${CMAKE_BINARY_DIR}/packages)
# The version is read when cpack runs, from what the build wrote: a package
# always carries its binaries' own version.
set(CPACK_PROJECT_CONFIG_FILE ${CMAKE_CURRENT_BINARY_DIR}/cpack_project_config.cmake)
file(WRITE ${CPACK_PROJECT_CONFIG_FILE} "
include(\"${CMAKE_CURRENT_SOURCE_DIR}/deb_version.cmake\")
if(NOT EXISTS \"${CMAKE_BINARY_DIR}/flotilla-version.txt\")
  message(FATAL_ERROR \"build first: ${CMAKE_BINARY_DIR}/flotilla-version.txt is missing\")
endif()
file(STRINGS \"${CMAKE_BINARY_DIR}/flotilla-version.txt\" _v LIMIT_COUNT 1)
flotilla_deb_version(_deb \"\${_v}\")
set(CPACK_PACKAGE_VERSION \"\${_deb}\")
set(CPACK_DEBIAN_PACKAGE_VERSION \"\${_deb}\")
")

set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_HOMEPAGE "https://flotilla.example")
# dpkg-shlibdeps: Depends from the libraries the binaries really link.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_COMPRESSION_TYPE xz)

set(_pkg ${CMAKE_CURRENT_SOURCE_DIR}/debian)

set(CPACK_DEBIAN_HUB_PACKAGE_NAME flotilla-hub)
set(CPACK_DEBIAN_HUB_PACKAGE_SECTION net)
# adduser for the system user; mosquitto is the embedded broker.
set(CPACK_DEBIAN_HUB_PACKAGE_DEPENDS "adduser, mosquitto")
set(CPACK_DEBIAN_HUB_PACKAGE_RECOMMENDS "flotilla")
set(CPACK_COMPONENT_HUB_DESCRIPTION "Flotilla hub: rollout campaigns for fleets of k3s edge devices
flotilla-hub serves Flotilla's REST API, runs rollout campaigns (canary,
waves, thresholds, automatic rollback) and keeps the device store. It
starts and configures its own mosquitto broker on mutual TLS: each
device gets a client certificate from the hub's CA, and an ACL confines
it to its own topics.
This package runs it as a systemd service under its own system user,
with its data in /var/lib/flotilla and its settings in
/etc/flotilla/hub.yaml.")
set(CPACK_DEBIAN_HUB_PACKAGE_CONTROL_EXTRA "${_pkg}/hub/conffiles;${_pkg}/hub/postinst;${_pkg}/hub/prerm;${_pkg}/hub/postrm")
set(CPACK_DEBIAN_HUB_PACKAGE_CONTROL_STRICT_PERMISSION ON)

set(CPACK_DEBIAN_CLI_PACKAGE_NAME flotilla)
set(CPACK_COMPONENT_CLI_DESCRIPTION "command-line client of Flotilla, a fleet manager for k3s edge devices
The flotilla command operates a Flotilla fleet: keys and signed bundles
(locally), and through a hub's REST API devices, enrollment tokens,
campaigns, declarative apply/diff and Git sync; it also injects the agent
into device images. Contexts (like kubeconfig) keep hub URLs and token files.")

set(CPACK_DEBIAN_AGENT_PACKAGE_NAME flotilla-agent)
# A fully static binary: no library dependencies at all.
set(CPACK_DEBIAN_AGENT_PACKAGE_SHLIBDEPS OFF)
set(CPACK_COMPONENT_AGENT_DESCRIPTION "Flotilla edge agent: installs, upgrades and health-checks k3s
flotilla-agent runs on each edge device. It verifies every bundle the hub
sends against keys pinned on the device, installs it the way k3s lays
itself out, restarts k3s, health-checks it and rolls back on its own when
k3s does not come up healthy. It is one static binary; this package adds
its systemd unit and OpenRC script (the same files that flotilla image
inject writes into device images).")
set(CPACK_DEBIAN_AGENT_PACKAGE_CONTROL_EXTRA "${_pkg}/agent/conffiles;${_pkg}/agent/postinst;${_pkg}/agent/prerm;${_pkg}/agent/postrm")
set(CPACK_DEBIAN_AGENT_PACKAGE_CONTROL_STRICT_PERMISSION ON)

include(CPack)
