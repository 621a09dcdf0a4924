#!/usr/bin/env bash
# Builds the minimal, static OpenSSL the static flotilla-agent links
# (docs/adr/0007-minimal-openssl-for-the-agent.md):
#
#   scripts/build-openssl-min.sh <prefix> [aarch64|armhf]
#                              -> <prefix>/lib/libssl.a, libcrypto.a, include/
#                                 for this machine, or cross-compiled with
#                                 Debian's <triplet>-gcc for the named arch
#
# Source: Debian's own openssl source package (upstream tarball plus Debian's
# patches, which `dpkg-source -x` applies), fetched with a private apt state
# under <prefix>-src/ so the machine's apt sources are not touched and no root
# is needed (the same approach as scripts/build-agent-cross.sh). Everything the
# agent does not use is compiled out: see CONFIGURE_OPTIONS below.
#
# Idempotent: a quick no-op when <prefix> holds the libraries built from this
# recipe (a stamp with the hash of the options). FLOTILLA_JOBS caps parallelism.
# FLOTILLA_OPENSSL_SRC_CACHE names where the fetched source is kept (default
# <prefix>-src), so the native and cross builds can share one download.
set -euo pipefail
PREFIX="${1:?usage: $0 <prefix-dir> [aarch64|armhf]}"
CROSS_ARCH="${2:-}"
mkdir -p "$(dirname "$PREFIX")"
PREFIX="$(cd "$(dirname "$PREFIX")" && pwd)/$(basename "$PREFIX")"
CACHE="${FLOTILLA_OPENSSL_SRC_CACHE:-$PREFIX-src}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
JOBS="${FLOTILLA_JOBS:-$(nproc)}"

# OpenSSL's Configure target; a cross build also names Debian's cross compiler
# (gcc-<triplet>, which scripts/setup.sh installs). linux-armv4 is OpenSSL's
# generic 32-bit Arm target: its assembly picks NEON and the ARMv7/v8 crypto
# extensions at run time, and the compiler's defaults (Debian armhf: ARMv7-A,
# Thumb-2, VFPv3-D16, hard float) decide the rest.
CROSS_PREFIX=()
case "$CROSS_ARCH" in
  "")
    case "$(uname -m)" in
      x86_64) TARGET=linux-x86_64 ;;
      aarch64) TARGET=linux-aarch64 ;;
      *) echo "build-openssl-min: no OpenSSL target for $(uname -m)" >&2; exit 1 ;;
    esac ;;
  aarch64) TARGET=linux-aarch64; CROSS_PREFIX=(--cross-compile-prefix=aarch64-linux-gnu-) ;;
  armhf) TARGET=linux-armv4; CROSS_PREFIX=(--cross-compile-prefix=arm-linux-gnueabihf-) ;;
  *) echo "build-openssl-min: unknown arch '$CROSS_ARCH' (aarch64 or armhf)" >&2; exit 2 ;;
esac
if [ "${#CROSS_PREFIX[@]}" -gt 0 ] && ! command -v "${CROSS_PREFIX[0]#--cross-compile-prefix=}gcc" >/dev/null; then
  echo "build-openssl-min: ${CROSS_PREFIX[0]#--cross-compile-prefix=}gcc missing (scripts/setup.sh installs it)" >&2
  exit 1
fi

# What the agent uses, and so keeps: TLS 1.2 and 1.3 client (Paho C's ssl://,
# Boost.Asio's HTTPS in common/src/http_client.cpp), X.509 chain verification
# with RSA and ECDSA (P-256/P-384) and Ed25519 certificates, ECDHE (X25519,
# NIST curves), finite-field DHE for TLS 1.2 servers that offer nothing better,
# AES-GCM and AES-CBC, ChaCha20-Poly1305, SHA-1/SHA-2/SHA-3, HMAC/HKDF, PSK
# (Paho C calls SSL_CTX_set_psk_client_callback), PEM and X.509 parsing (the
# k3s serving certificate's notAfter). Bundle signatures are libsodium's.
CONFIGURE_OPTIONS=(
  # a static library: no shared objects, no loadable providers or engines
  no-shared no-module no-dso no-engine no-legacy no-pic
  # protocols: TLS 1.2 and 1.3 only, no datagrams, no compression
  no-ssl3 no-tls1 no-tls1_1 no-dtls no-dgram no-sctp no-comp no-zlib
  no-srp no-srtp no-nextprotoneg no-ct no-ocsp no-weak-ssl-ciphers no-ssl-trace
  # ciphers and digests no TLS 1.2/1.3 suite or certificate here uses
  no-aria no-bf no-camellia no-cast no-des no-idea no-mdc2 no-rc2 no-rc4 no-rc5
  no-seed no-sm2 no-sm3 no-sm4 no-gost no-md4 no-rmd160 no-whirlpool no-blake2
  no-siphash no-ocb no-siv no-cmac no-scrypt no-dsa no-ec2m no-multiblock
  # message formats and services the agent never touches
  no-cms no-cmp no-ts no-rfc3779
  # runtime machinery: no config file autoloaded, no console prompts, no async
  no-autoload-config no-ui-console no-async no-rdrand no-capieng no-afalgeng
  no-padlockeng no-devcryptoeng no-loadereng
  # smaller error records; no apps or tests are built either way
  no-filenames no-tests
)
CFLAGS_EXTRA=(-Os -ffunction-sections -fdata-sections -fno-asynchronous-unwind-tables -fno-unwind-tables)

# The stamp: bump RECIPE_REVISION when the fetch or build steps below change
# what ends up in the libraries; the options and target are hashed as they are.
RECIPE_REVISION=2
recipe="$(printf '%s\n' "$RECIPE_REVISION" "$TARGET" "${CROSS_PREFIX[@]}" "${CONFIGURE_OPTIONS[@]}" "${CFLAGS_EXTRA[@]}" |
  sha256sum | cut -c1-16)"
stamp="$PREFIX/.flotilla-recipe"
if [ -f "$PREFIX/lib/libssl.a" ] && [ -f "$PREFIX/lib/libcrypto.a" ] && [ -f "$stamp" ] &&
  [ "$(head -1 "$stamp")" = "$recipe" ]; then
  exit 0
fi

fail() {
  cat >&2 <<EOF
build-openssl-min: $1
The static flotilla-agent links a minimal OpenSSL built from Debian's openssl
source package (docs/adr/0007-minimal-openssl-for-the-agent.md). It needs
apt-get and dpkg-source (scripts/setup.sh installs dpkg-dev) and Debian's apt
mirror for bookworm. Fix that and run the build again, or configure with
-DFLOTILLA_STATIC_AGENT=OFF for a dynamically linked agent.
EOF
  exit 1
}
command -v apt-get >/dev/null || fail "apt-get is missing"
command -v dpkg-source >/dev/null || fail "dpkg-source is missing"

# A private apt state with Debian's source indexes (bookworm and its security
# updates, where newer openssl versions land).
echo "==> build-openssl-min: building a minimal OpenSSL into $PREFIX" >&2
start=$(date +%s)
apt_dir="$CACHE/apt"
mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$CACHE/dl"
: >"$apt_dir/state/status"
cat >"$apt_dir/sources.list" <<SRC
deb-src http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm-updates main
deb-src http://deb.debian.org/debian-security bookworm-security main
SRC
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/state/status" -o "Dir::Cache=$apt_dir/cache"
  -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null -o Debug::NoLocking=1
  -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update -qq || echo "warning: some source indexes failed to update (see above)" >&2

# The version of the libssl-dev headers Paho C's static library was compiled
# against comes first; any other 3.0.x follows, newest first (the OpenSSL 3.0
# ABI is stable across patch releases, and a mirror may lack one version's files).
installed="$(dpkg-query -W -f='${Version}' libssl-dev 2>/dev/null || true)"
mapfile -t available < <(apt-cache "${apt_opts[@]}" showsrc openssl 2>/dev/null |
  awk '/^Package: /{p=$2} /^Version: /{if (p=="openssl") print $2}' | grep '^3\.0\.' |
  sort -u | sort -r -V)
[ "${#available[@]}" -gt 0 ] || fail "no openssl 3.0.x source package found in Debian's source indexes"
candidates=()
for v in "${available[@]}"; do [ "$v" = "$installed" ] && candidates+=("$v"); done
for v in "${available[@]}"; do [ "$v" != "$installed" ] && candidates+=("$v"); done

version=""
for v in "${candidates[@]}"; do
  src="$CACHE/openssl-$v"
  if [ -f "$src/.flotilla-unpacked" ]; then version="$v"; break; fi
  echo "==> build-openssl-min: fetching Debian's openssl $v source" >&2
  if (cd "$CACHE/dl" && apt-get "${apt_opts[@]}" source --download-only -qq "openssl=$v" >"$CACHE/fetch.log" 2>&1); then
    rm -rf "$src"
    # apt checked the files against the signed Sources index; dpkg-source
    # unpacks the upstream tarball and applies debian/patches.
    dpkg-source -x "$CACHE/dl/openssl_${v#*:}.dsc" "$src" >"$CACHE/unpack.log" 2>&1 ||
      fail "dpkg-source could not unpack openssl $v (see $CACHE/unpack.log)"
    touch "$src/.flotilla-unpacked"
    version="$v"
    break
  fi
  echo "warning: openssl $v could not be fetched ($(grep -m1 '^E:' "$CACHE/fetch.log" || tail -1 "$CACHE/fetch.log")); trying the next version" >&2
done
[ -n "$version" ] || fail "could not fetch Debian's openssl source (tried ${candidates[*]})"
[ "$version" = "$installed" ] || echo "note: building openssl $version (libssl-dev is $installed)" >&2

# A fixed install prefix, staged and moved to <prefix>: OpenSSL bakes its
# (unused, no-module no-engine) engines and modules directories into
# libcrypto, and the agent should not depend on where the build tree is.
INSTALL_PREFIX=/opt/flotilla/openssl-min
build="$CACHE/build-$recipe"
rm -rf "$build" "$PREFIX.stage"  # what an interrupted run left
mkdir -p "$build"
(
  cd "$build"
  "$CACHE/openssl-$version/Configure" "$TARGET" "${CROSS_PREFIX[@]}" "${CONFIGURE_OPTIONS[@]}" \
    --prefix="$INSTALL_PREFIX" --libdir=lib --openssldir=/usr/lib/ssl "${CFLAGS_EXTRA[@]}" >configure.log 2>&1 ||
    { tail -20 configure.log >&2; fail "Configure failed (see $build/configure.log)"; }
  make -j "$JOBS" build_libs >make.log 2>&1 || { tail -20 make.log >&2; fail "make failed (see $build/make.log)"; }
  make install_dev DESTDIR="$PREFIX.stage" >install.log 2>&1 || fail "make install_dev failed (see $build/install.log)"
)
rm -rf "$PREFIX"
mv "$PREFIX.stage$INSTALL_PREFIX" "$PREFIX"
rm -rf "$PREFIX/lib/pkgconfig"  # would name INSTALL_PREFIX; CMake links by path
rm -rf "$PREFIX.stage" "$build"
printf '%s\nopenssl %s\n%s\n' "$recipe" "$version" "${CONFIGURE_OPTIONS[*]}" >"$stamp"
echo "==> build-openssl-min: openssl $version for $TARGET in $(($(date +%s) - start)) s" >&2
