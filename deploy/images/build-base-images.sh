#!/usr/bin/env bash
# Build the base images the blueprint needs (python, redis, nginx) from Debian
# packages, without any container registry: mmdebstrap assembles a root
# filesystem from the apt sources this machine already uses, `docker import`
# turns it into an image. An air-gapped site points its apt sources at its own
# Debian mirror and runs the same command.
#
#   deploy/images/build-base-images.sh [--force] [python|redis|nginx ...]
#
# An image whose tag already exists is kept unless --force is given. On stdout
# the script prints the image variables to use them (PYTHON_IMAGE=... lines,
# the format of .env); everything else goes to stderr.
# Needs root (or mmdebstrap's unshare mode: the uidmap package and subuids),
# mmdebstrap, and a Docker engine.
set -o errexit -o pipefail -o nounset

SUITE=bookworm
REPOSITORY="${BASE_IMAGE_REPOSITORY:-blueprint-base}"

# Per image: the packages, the package whose version is the tag, and that
# version as of Debian 12 (major.minor is fixed within a stable release, so
# the tag is known before building; the build checks it still holds).
declare -A PACKAGES=(
    [python]="python3,python3-venv,ca-certificates,passwd"   # passwd: useradd for the app user
    [redis]="redis-server"
    [nginx]="nginx-light,gettext-base,wget"                  # envsubst, and wget for the healthcheck
)
declare -A VERSION_PACKAGE=([python]=python3 [redis]=redis-server [nginx]=nginx-light)
declare -A VERSION=([python]=3.11 [redis]=7.0 [nginx]=1.22)
declare -A VARIABLE=([python]=PYTHON_IMAGE [redis]=REDIS_IMAGE [nginx]=NGINX_IMAGE)
declare -A CHANGES=(
    [python]='CMD ["python3"]'
    [redis]=$'USER redis\nWORKDIR /var/lib/redis\nEXPOSE 6379\nCMD ["redis-server"]'
    [nginx]='CMD ["nginx", "-g", "daemon off;"]'
)

tag_of() { echo "$REPOSITORY/$1:${VERSION[$1]}-$SUITE"; }

# The apt sources files of this machine that serve $SUITE (deb822 or one-line
# style), so the images get the same mirror, proxy-free or local, as the host.
# APT_SOURCES (a file) overrides; with none, mmdebstrap uses deb.debian.org.
apt_sources() {
    if [ -n "${APT_SOURCES:-}" ]; then
        echo "$APT_SOURCES"
        return
    fi
    local file
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [ -s "$file" ] && grep -Eq "^[^#]*(^|[[:space:]])$SUITE([[:space:]]|\$)" "$file" && echo "$file"
    done
    return 0
}

build() {
    local name=$1 tag version
    local rootfs="$WORKDIR/$name.tar" versions="$WORKDIR/$name.versions"
    tag=$(tag_of "$name")
    local sources=()
    mapfile -t sources < <(apt_sources)
    echo "building $tag from ${sources[*]:-deb.debian.org}" >&2
    local started=$SECONDS
    # Documentation, man pages and translations are left out (copyright files
    # stay); mmdebstrap already drops the apt lists and caches.
    mmdebstrap --quiet --variant=apt --include="${PACKAGES[$name]}" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook="chroot \"\$1\" dpkg-query --show --showformat='\${Package} \${Version}\n' > '$versions'" \
        "$SUITE" "$rootfs" "${sources[@]}"
    version=$(awk -v p="${VERSION_PACKAGE[$name]}" '$1 == p {print $2}' "$versions")
    # Strip the epoch, keep major.minor.
    version=${version#*:}
    if [ "$(echo "$version" | cut -d. -f1-2)" != "${VERSION[$name]}" ]; then
        echo "error: $SUITE now ships ${VERSION_PACKAGE[$name]} $version, not ${VERSION[$name]}: update VERSION in $0" >&2
        return 1
    fi
    local changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
                   --change 'ENV LANG=C.UTF-8'
                   --change "LABEL org.opencontainers.image.version=$version"
                   --change "LABEL org.opencontainers.image.base.name=debian:$SUITE"
                   --change "LABEL org.opencontainers.image.description=\"${PACKAGES[$name]} from Debian $SUITE, built by deploy/images\"")
    local line
    while IFS= read -r line; do
        changes+=(--change "$line")
    done <<<"${CHANGES[$name]}"
    docker import "${changes[@]}" "$rootfs" "$tag" >/dev/null
    rm -f "$rootfs"
    echo "built $tag (${VERSION_PACKAGE[$name]} $version) in $((SECONDS - started)) s" >&2
}

main() {
    local force=0 names=()
    for arg in "$@"; do
        case "$arg" in
            --force) force=1 ;;
            python|redis|nginx) names+=("$arg") ;;
            -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; return 0 ;;
            *) echo "unknown argument: $arg (expected --force, python, redis or nginx)" >&2; return 2 ;;
        esac
    done
    [ ${#names[@]} -gt 0 ] || names=(python redis nginx)
    for tool in mmdebstrap docker; do
        command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install $tool)" >&2; return 1; }
    done
    WORKDIR=$(mktemp --directory --tmpdir base-images.XXXXXX)
    trap 'rm -rf "$WORKDIR"' EXIT
    for name in "${names[@]}"; do
        if [ "$force" -eq 0 ] && docker image inspect "$(tag_of "$name")" >/dev/null 2>&1; then
            echo "kept $(tag_of "$name") (exists; --force rebuilds it)" >&2
        else
            build "$name"
        fi
        echo "${VARIABLE[$name]}=$(tag_of "$name")"
    done
}

main "$@"
