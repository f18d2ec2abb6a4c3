#!/usr/bin/env bash
# Builds the Debian packages cis490-shipper and cis490-receiver (cargo-deb, release) into
# target/debian/, lints them (any lintian error fails), installs them into a scratch root with
# dpkg (maintainer scripts run chrootless under DPKG_ROOT, so the real system is not touched),
# checks files, user, directories, config, a reinstall and a purge, and runs the installed
# binaries. Prints PASS/FAIL lines; exits 1 on any FAIL. Installs cargo-deb, lintian and
# dpkg-dev when missing. Usage: scripts/package.sh [--keep-root]
# CIS490_PACKAGE_PROFILE=dev packages the unoptimised build instead (CI: the test build's
# compiled dependencies are reused, so checking the packaging costs no release build).
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP_ROOT=0
[[ ${1:-} == --keep-root ]] && KEEP_ROOT=1
start=$SECONDS
FAILS=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
check() { # description command...
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

# --- prerequisites ---------------------------------------------------------------------------
apt_missing=()
command -v lintian >/dev/null || apt_missing+=(lintian)
command -v dpkg-shlibdeps >/dev/null || apt_missing+=(dpkg-dev)
command -v systemd-analyze >/dev/null || apt_missing+=(systemd)
if ((${#apt_missing[@]})); then
  echo "installing ${apt_missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb (cargo install cargo-deb --locked)"
  cargo install cargo-deb --locked --quiet
fi

# --- build -----------------------------------------------------------------------------------
target=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n $target ]] || { echo "FAIL: cannot find the cargo target directory"; exit 1; }
profile=${CIS490_PACKAGE_PROFILE:-release}
case $profile in
  release) profdir=release ;;
  dev) profdir=debug ;;
  *) echo "FAIL: CIS490_PACKAGE_PROFILE is release or dev, not $profile"; exit 1 ;;
esac
cargo build --profile "$profile" --locked -p cis490-shipper -p cis490-receiver -p cis490-xtask
# cargo-deb reads the assets' target/release/ paths from the selected profile's directory.
assets="$target/$profdir/deb-assets"
rm -rf "$assets"
mkdir -p "$assets"
"$target/$profdir/cis490-gen-docs" "$assets" >/dev/null
gzip -9n "$assets"/man/*.1
for u in cis490-shipper cis490-receiver; do
  # The packaged unit: ExecStart from /usr/bin, the docs of the package; nothing else differs.
  sed -e 's#/opt/cis490/bin/#/usr/bin/#' \
    -e "s#^Documentation=.*#Documentation=man:$u(1) file:///usr/share/doc/$u/#" \
    "etc/$u.service" >"$assets/$u.service"
  check "$u.service: only ExecStart and Documentation differ from etc/$u.service" \
    cmp -s <(grep -v '^ExecStart=\|^Documentation=' "etc/$u.service") \
    <(grep -v '^ExecStart=\|^Documentation=' "$assets/$u.service")
done
mkdir -p "$target/debian"
rm -f "$target"/debian/cis490-shipper_*.deb "$target"/debian/cis490-receiver_*.deb
for p in cis490-shipper cis490-receiver; do
  cargo deb --no-build --strip --profile "$profile" -p "$p" --output "$target/debian/" >/dev/null
done
ship=$(echo "$target"/debian/cis490-shipper_*.deb)
recv=$(echo "$target"/debian/cis490-receiver_*.deb)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
for deb in "$ship" "$recv"; do
  check "built $(basename "$deb")" test -f "$deb"
  check "$(basename "$deb"): version $version-1 (the workspace version)" \
    test "$(dpkg-deb -f "$deb" Version)" = "$version-1"
done

# --- lintian ---------------------------------------------------------------------------------
for deb in "$ship" "$recv"; do
  out=$(lintian --fail-on error "$deb" 2>&1) && rc=0 || rc=$?
  [[ -n $out ]] && printf '%s\n' "$out" | sed 's/^/  lintian: /'
  check "lintian: no error in $(basename "$deb") ($(grep -c '^W: ' <<<"$out" || true) warning(s))" test "$rc" = 0
done

# --- install into a scratch root ---------------------------------------------------------------
root=$(mktemp -d /tmp/cis490-deb-root.XXXXXX)
if ((KEEP_ROOT)); then echo "scratch root kept: $root"; else trap 'rm -rf "$root"' EXIT; fi
mkdir -p "$root"/var/lib/dpkg/{info,updates,triggers} "$root/etc"
: >"$root/var/lib/dpkg/status"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'root:*:20000:0:99999:7:::\n' >"$root/etc/shadow"
printf 'root:*::\n' >"$root/etc/gshadow"
chmod 0640 "$root/etc/shadow" "$root/etc/gshadow"
# Chrootless: the maintainer scripts run here with DPKG_ROOT=$root (an empty root has no shell to
# chroot into); dependencies (libc6, passwd) are this machine's, hence --force-depends.
dpkg_root() { dpkg --root="$root" --force-script-chrootless --force-depends --force-unsafe-io "$@"; }
if log=$(dpkg_root -i "$ship" "$recv" 2>&1); then
  pass "dpkg --root installs both packages (maintainer scripts under DPKG_ROOT)"
else
  printf '%s\n' "$log"
  fail "dpkg --root installs both packages"
fi
printf '%s\n' "$log" | grep '^cis490-' | sed 's/^/  postinst: /' || true

want=(
  usr/bin/cis490-shipper usr/bin/cis490-receiver
  lib/systemd/system/cis490-shipper.service lib/systemd/system/cis490-receiver.service
  usr/share/man/man1/cis490-shipper.1.gz usr/share/man/man1/cis490-shipper-doctor.1.gz
  usr/share/man/man1/cis490-receiver.1.gz usr/share/man/man1/cis490-receiver-pki-issue.1.gz
  usr/share/bash-completion/completions/cis490-shipper usr/share/bash-completion/completions/cis490-receiver
  usr/share/zsh/vendor-completions/_cis490-shipper usr/share/zsh/vendor-completions/_cis490-receiver
  usr/share/fish/vendor_completions.d/cis490-shipper.fish usr/share/fish/vendor_completions.d/cis490-receiver.fish
  usr/share/doc/cis490-shipper/lab-host.toml.example usr/share/doc/cis490-receiver/receiver.toml.example
  usr/share/cis490-shipper/lab-host.toml.example usr/share/cis490-receiver/receiver.toml.example
  usr/share/doc/cis490-shipper/copyright usr/share/doc/cis490-receiver/copyright
)
missing=()
for f in "${want[@]}"; do [[ -f $root/$f ]] || missing+=("$f"); done
check "installed files (${#want[@]}): ${missing[*]:-all present}" test ${#missing[@]} = 0
check "no file under /opt" test ! -e "$root/opt"
for u in cis490-shipper cis490-receiver; do
  check "$u.service: ExecStart=/usr/bin/$u" grep -q "^ExecStart=/usr/bin/$u " "$root/lib/systemd/system/$u.service"
  check "$u.service is not enabled" test -z "$(find "$root/etc" -name "$u.service" -print -quit)"
  out=$("$root/usr/bin/$u" --version 2>&1) || true
  check "$u --version: $out" grep -q "^$u $version " <<<"$out"
done
# gzip -n: no FNAME flag (byte 3) and a zero MTIME (bytes 4-7).
check "man pages are gzip -9n (no name, no time)" \
  test -z "$(for f in "$root"/usr/share/man/man1/*.gz; do [[ $(od -An -tx1 -j3 -N5 "$f" | tr -d ' ') == 0000000000 ]] || echo "$f"; done)"
vdir=$(mktemp -d)
for u in cis490-shipper cis490-receiver; do
  # The binaries and man pages are in the scratch root, not where the unit names them.
  sed -e "s#^ExecStart=/usr/bin/#ExecStart=$root/usr/bin/#" -e '/^Documentation=/d' \
    "$root/lib/systemd/system/$u.service" >"$vdir/$u.service"
done
out=$(cd "$vdir" && { SYSTEMD_LOG_LEVEL=notice systemd-analyze verify ./cis490-shipper.service ./cis490-receiver.service 2>&1 || true; })
rm -rf "$vdir"
check "systemd-analyze verify accepts the packaged units${out:+: $out}" test -z "$out"

# postinst: user, directories, config
uid_gid=$(grep '^cis490:' "$root/etc/passwd" | cut -d: -f3,4)
check "postinst created the system user cis490 ($uid_gid, home /var/lib/cis490, nologin)" \
  grep -q '^cis490:x:[0-9]*:[0-9]*::/var/lib/cis490:/usr/sbin/nologin$' "$root/etc/passwd"
check "postinst created the group cis490" grep -q '^cis490:' "$root/etc/group"
for d in "" /episodes /outbox /shipped /quarantine /store; do
  check "/var/lib/cis490$d: 750 owned by cis490" \
    test "$(stat -c %a:%u:%g "$root/var/lib/cis490$d" 2>/dev/null)" = "750:$uid_gid"
done
for c in lab-host:cis490-shipper receiver:cis490-receiver; do
  name=${c%%:*} pkg=${c#*:}
  check "/etc/cis490/$name.toml from the example, 640 root:cis490" \
    test "$(stat -c %a:%u:%g "$root/etc/cis490/$name.toml" 2>/dev/null)" = "640:0:${uid_gid#*:}"
  check "/etc/cis490/$name.toml is the example" cmp -s "$root/etc/cis490/$name.toml" "$root/usr/share/$pkg/$name.toml.example"
  check "/etc/cis490/$name.toml is not a conffile" test ! -s "$root/var/lib/dpkg/info/$pkg.conffiles"
done

# Reinstall (the upgrade path: postinst configure with the old version): an edited config is kept,
# the user is not duplicated.
echo "# edited by the admin" >>"$root/etc/cis490/lab-host.toml"
if log=$(dpkg_root -i "$ship" "$recv" 2>&1); then pass "reinstall over itself"; else printf '%s\n' "$log"; fail "reinstall over itself"; fi
check "reinstall keeps an edited /etc/cis490/lab-host.toml" grep -q '^# edited by the admin$' "$root/etc/cis490/lab-host.toml"
check "reinstall keeps one cis490 user" test "$(grep -c '^cis490:' "$root/etc/passwd")" = 1

# Purge: the configs go, the user and the data stay.
touch "$root/var/lib/cis490/episodes/keep-me"
if log=$(dpkg_root --purge cis490-shipper cis490-receiver 2>&1); then pass "dpkg --purge both"; else printf '%s\n' "$log"; fail "dpkg --purge both"; fi
check "purge removes the configs and the empty /etc/cis490" test ! -e "$root/etc/cis490"
check "purge removes the binaries" test ! -e "$root/usr/bin/cis490-shipper" -a ! -e "$root/usr/bin/cis490-receiver"
check "purge keeps the cis490 user" grep -q '^cis490:' "$root/etc/passwd"
check "purge keeps /var/lib/cis490 and its data" test -f "$root/var/lib/cis490/episodes/keep-me"

echo "packages: $ship $recv"
echo "package.sh took $((SECONDS - start)) s"
if ((FAILS)); then
  echo "package: FAIL ($FAILS check(s) failed)"
  exit 1
fi
echo "package: PASS"
