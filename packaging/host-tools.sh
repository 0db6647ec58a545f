# Sourced by the project's setup scripts (packaging/build.sh, tests/setup.sh, tests/vm/image.sh):
# installs host tools and then proves each one runs, so that a missing or broken tool is one
# clear line naming its package at setup, not a "command not found" twenty minutes later.
# Set HOST_TOOLS_WHO to the caller's name (it starts every message).

: "${HOST_TOOLS_WHO:=setup}"

# require_tool CMD PACKAGE [ARG...]: CMD ARG... must run and exit 0 (ARG is its cheapest
# version query); else exit 1 with a message naming PACKAGE and the command's own words.
require_tool() {
    local cmd=$1 pkg=$2 out
    shift 2
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "$HOST_TOOLS_WHO: '$cmd' is missing after installing it: install $pkg" >&2
        exit 1
    fi
    if ! out=$("$cmd" "$@" 2>&1 </dev/null); then
        echo "$HOST_TOOLS_WHO: '$cmd $*' does not run (package $pkg): $(printf '%s' "$out" | head -c 400)" >&2
        exit 1
    fi
}

# installed_version PACKAGE: the installed version, or nothing.
installed_version() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null | awk '$1 == "ii" { print $2 }'
}

# apt_update: refresh the package lists once per script.
apt_update() {
    [[ -n ${HOST_TOOLS_UPDATED:-} ]] && return 0
    apt-get update -q >&2
    HOST_TOOLS_UPDATED=1
}

# apt_install [APT-GET-ARG...] PACKAGE...: apt-get install, after refreshing the package lists
# (a fresh machine may have none, or stale ones that name versions the mirror dropped).
apt_install() {
    echo "$HOST_TOOLS_WHO: installing $*" >&2
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
}

# qemu_matched_set: prints "qemu-system-x86=V qemu-utils=V" when the two are not already
# installed at one version, else nothing. They must come from one qemu build: a newer
# qemu-utils (a machine image may ship bookworm-backports' 10.x without the backports source)
# Breaks bookworm's qemu-system-common, and apt resolves that by *removing* qemu-utils (and
# with it qemu-img). V is the qemu-system-x86 this machine can install (or has), so the
# newer qemu-utils is replaced by the same build, a downgrade apt must be allowed to make.
qemu_matched_set() {
    local sys utils
    sys=$(installed_version qemu-system-x86)
    utils=$(installed_version qemu-utils)
    [[ -n $sys && $sys == "$utils" ]] && return 0
    if [[ -z $sys ]]; then
        apt_update
        sys=$(apt-cache policy qemu-system-x86 | awk '$1 == "Candidate:" { print $2 }')
        if [[ -z $sys || $sys == "(none)" ]]; then
            echo "$HOST_TOOLS_WHO: apt has no qemu-system-x86 to install (check /etc/apt/sources.list)" >&2
            exit 1
        fi
    fi
    echo "qemu-system-x86=$sys qemu-utils=$sys"
}

# ensure_tools [--no-install-recommends] SPEC...: SPEC is CMD:PACKAGE[:ARGS], ARGS the
# command's cheapest self-check (split on spaces). Installs, in one apt transaction, the
# packages whose commands are missing (qemu-system-x86 and qemu-utils always as a matched
# set), then proves every command runs.
ensure_tools() {
    local opts=() need=() qemu= spec cmd pkg args
    [[ ${1:-} == --no-install-recommends ]] && { opts+=("$1"); shift; }
    for spec; do
        IFS=: read -r cmd pkg args <<<"$spec"
        case $pkg in
            qemu-system-x86 | qemu-utils) qemu=1 ;;
            *) command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg") ;;
        esac
    done
    if [[ -n $qemu ]]; then
        local set
        set=$(qemu_matched_set)
        [[ -n $set ]] && { read -ra set <<<"$set"; need+=("${set[@]}"); opts+=(--allow-downgrades); }
    fi
    if ((${#need[@]})); then
        apt_install "${opts[@]}" "${need[@]}"
    fi
    check_tools "$@"
}

# check_tools SPEC...: every command of SPEC (as ensure_tools) runs.
check_tools() {
    local spec cmd pkg args argv
    for spec; do
        IFS=: read -r cmd pkg args <<<"$spec"
        read -ra argv <<<"$args"
        require_tool "$cmd" "$pkg" "${argv[@]}"
    done
}

# ensure_packagers: cargo-deb 3.8.0 and cargo-generate-rpm 0.21.1 (crates.io), at those pins
# (the packaging tests check their maintainer-script output), installed when missing or
# another version, then proven to answer with the pinned version.
ensure_packagers() {
    command -v cargo >/dev/null || { echo "$HOST_TOOLS_WHO: cargo not found; install Rust >= 1.89 (rustup)" >&2; exit 1; }
    local pair sub crate version got
    for pair in deb:cargo-deb:3.8.0 generate-rpm:cargo-generate-rpm:0.21.1; do
        IFS=: read -r sub crate version <<<"$pair"
        if ! cargo "$sub" --version 2>/dev/null | grep -qF "$version"; then
            echo "$HOST_TOOLS_WHO: installing $crate $version" >&2
            cargo install --locked --quiet "$crate@$version"
        fi
        got=$(cargo "$sub" --version 2>&1 </dev/null) || true
        if [[ $got != *"$version"* ]]; then
            echo "$HOST_TOOLS_WHO: 'cargo $sub --version' says '$(printf '%s' "$got" | head -c 200)', not $version: cargo install --locked --force $crate@$version" >&2
            exit 1
        fi
    done
}
