# Shared by install-lab-host.sh and install-receiver.sh. Every step checks before it changes
# anything, so a second run changes nothing and says so.
# shellcheck shell=bash

ROOT=""
BIN_DIR=""
CHANGED=0
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

say() { printf '%s\n' "$*"; }
changed() { CHANGED=1; say "  changed: $*"; }
die() { say "error: $*" >&2; exit 1; }

parse_args() {
  while (($#)); do
    case $1 in
      --root) ROOT=$(realpath -m "$2"); shift 2 ;;
      --bin-dir) BIN_DIR=$(realpath "$2"); shift 2 ;;
      -h|--help)
        say "usage: $0 [--root DIR] [--bin-dir DIR]"
        say "  --root DIR     install under DIR (for packaging and tests); skips user creation and systemctl"
        say "  --bin-dir DIR  take cis490-receiver/cis490-shipper from DIR instead of building them"
        exit 0 ;;
      *) die "unknown argument $1 (see --help)" ;;
    esac
  done
  INSTALL="$ROOT/opt/cis490"
  ETC="$ROOT/etc/cis490"
  UNITS="$ROOT/etc/systemd/system"
  DATA="$ROOT/var/lib/cis490"
}

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if ((${#missing[@]})); then
    die "missing prerequisites: ${missing[*]} (on Debian: apt-get install ${missing[*]/cargo/cargo rustc})"
  fi
  if [[ -z $ROOT && $(id -u) -ne 0 ]]; then
    die "run as root (sudo $0), or use --root DIR"
  fi
}

ensure_user() {
  if [[ -n $ROOT ]]; then
    say "  skipped: creating the cis490 user (--root)"
    return
  fi
  if ! getent passwd cis490 >/dev/null; then
    useradd --system --home-dir /var/lib/cis490 --no-create-home --shell /usr/sbin/nologin cis490
    changed "created system user cis490"
  fi
}

owner() { getent passwd cis490 >/dev/null && [[ -z $ROOT ]] && echo cis490:cis490; }

ensure_dir() { # dir mode
  if [[ ! -d $1 ]]; then
    install -d -m "$2" "$1"
    changed "created $1"
  fi
  local o
  o=$(owner) || true
  if [[ -n $o && $(stat -c %U:%G "$1") != "$o" ]]; then
    chown "$o" "$1"
    changed "chown $o $1"
  fi
}

# Lists files of a tree (without build output, fuzzing state and installed binaries) with their
# content hash.
tree_fingerprint() {
  (cd "$1" && find . \( -path ./target -o -path ./bin -o -path ./demo-run -o -path ./fuzz/target \
    -o -path ./fuzz/corpus -o -path ./fuzz/artifacts \) -prune -o -type f -print0 \
    | LC_ALL=C sort -z | xargs -0 -r sha256sum)
}

# The checkout lives at /opt/cis490; copy it there unless we already run from there.
sync_checkout() {
  if [[ $SRC -ef $INSTALL ]]; then
    say "  running from the install root $INSTALL: nothing to copy"
    return
  fi
  local want have
  want=$(tree_fingerprint "$SRC")
  have=$( [[ -d $INSTALL ]] && tree_fingerprint "$INSTALL" || true)
  [[ $want == "$have" ]] && return
  mkdir -p "$INSTALL"
  tar -C "$SRC" --exclude=./target --exclude=./bin --exclude=./demo-run --exclude=./fuzz/target \
    --exclude=./fuzz/corpus --exclude=./fuzz/artifacts -cf - . | tar -C "$INSTALL" -xf -
  # Files deleted from the source go from the install root too.
  comm -13 <(cut -c67- <<<"$want") <(tree_fingerprint "$INSTALL" | cut -c67-) | while IFS= read -r f; do
    rm -f -- "$INSTALL/$f"
  done
  changed "synced $SRC to $INSTALL ($(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
}

install_binary() { # name
  local src
  if [[ -n $BIN_DIR ]]; then
    src="$BIN_DIR/$1"
  else
    (cd "$INSTALL" && cargo build --release --locked -q -p "$1") || die "cargo build of $1 failed"
    src="$INSTALL/target/release/$1"
  fi
  [[ -x $src ]] || die "$src is not an executable"
  ensure_dir "$INSTALL/bin" 0755
  if ! cmp -s "$src" "$INSTALL/bin/$1"; then
    install -m 0755 "$src" "$INSTALL/bin/$1.new"
    mv -f "$INSTALL/bin/$1.new" "$INSTALL/bin/$1"
    changed "installed $INSTALL/bin/$1"
  fi
}

install_file() { # src dest mode
  if ! cmp -s "$1" "$2"; then
    install -D -m "$3" "$1" "$2"
    changed "installed $2"
  fi
}

install_config() { # example dest
  if [[ -e $2 ]]; then
    say "  kept: $2 (existing config is never overwritten)"
    return
  fi
  install -D -m 0640 "$1" "$2"
  local o
  o=$(owner) || true
  [[ -n $o ]] && chown "root:${o#*:}" "$2"
  changed "installed $2 from the example: edit it before starting the service"
}

reload_units() { # unit
  if [[ -n $ROOT ]]; then
    say "  skipped: systemctl daemon-reload / restart (--root)"
    return
  fi
  if ! command -v systemctl >/dev/null || [[ ! -d /run/systemd/system ]]; then
    say "  skipped: systemd is not running here"
    return
  fi
  systemctl daemon-reload
  if systemctl is-enabled --quiet "$1" 2>/dev/null; then
    if ((CHANGED)); then
      systemctl restart "$1"
      say "  restarted $1 (enabled)"
    else
      say "  $1 is enabled; nothing changed, not restarted"
    fi
  else
    say "  $1 is not enabled: systemctl enable --now $1 once the config is ready"
  fi
}

finish() {
  if ((CHANGED)); then say "done"; else say "done: nothing changed"; fi
}
