#!/bin/sh
# The nginx image's entrypoint.
#
# Start (no argument, or nginx options): render the baked-in template into
# $NGINX_RUNTIME_DIR and exec nginx as PID 1. Only the template's own
# ${UPPERCASE} placeholders are substituted (nginx's $variables stay), and a
# placeholder whose variable is unset stops the start with its name: nginx
# never runs a half-filled config. An empty value is allowed on purpose
# (NGINX_RESOLVER is empty when upstreams are addresses).
#
# `reload` (through docker exec): reload the running nginx, which resolves the
# upstream names again (after a compose scale), and return once workers with
# the new configuration run and the old ones stopped accepting connections.
#
# POSIX sh: the official image is Alpine (busybox), the offline one Debian (dash).
set -o errexit -o nounset

# "pid title" of every nginx worker process.
workers() {
    for cmdline in /proc/[0-9]*/cmdline; do
        title=$(tr '\0' ' ' < "$cmdline" 2>/dev/null) || continue
        case "$title" in
            "nginx: worker process"*) pid=${cmdline#/proc/}; echo "${pid%/cmdline} $title" ;;
        esac
    done
}

reload() {
    before=$(workers | cut -d' ' -f1 | tr '\n' ' ')
    kill -HUP 1
    for _ in $(seq 100); do
        new=0 old_accepting=0
        while read -r pid title; do
            [ -n "$pid" ] || continue
            case "$title" in *"shutting down"*) continue ;; esac
            case " $before " in
                *" $pid "*) old_accepting=1 ;;
                *) new=1 ;;
            esac
        done <<WORKERS
$(workers)
WORKERS
        [ "$new" = 1 ] && [ "$old_accepting" = 0 ] && return 0
        sleep 0.1
    done
    echo "nginx did not reload within 10 s; its log says why" >&2
    return 1
}

if [ "${1:-}" = reload ]; then
    reload
    exit
fi

template=/etc/nginx/blueprint/nginx.conf.template
# shellcheck disable=SC2016 # the pattern matches a literal ${NAME}
placeholders=$(grep -o '\${[A-Z][A-Z0-9_]*}' "$template" | sort -u)
[ -n "$placeholders" ] || { echo "no placeholders found in $template" >&2; exit 1; }

missing=""
for placeholder in $placeholders; do
    name=${placeholder#??}
    name=${name%?}
    is_set=""
    eval "is_set=\${$name+set}"
    [ "$is_set" = set ] || missing="$missing $name"
done
if [ -n "$missing" ]; then
    echo "nginx: refusing to start, unset template variables:$missing" >&2
    exit 1
fi

# Every proxied WebSocket is two open files. Raise the soft open-file limit to
# the hard one, as the app image's entrypoint does (deploy/entrypoint.sh says
# why); the template's worker_rlimit_nofile then sets the workers' own.
# POSIX leaves ulimit's -H and -S out; dash and busybox ash, the two shells
# this runs on, have both.
# shellcheck disable=SC3045
hard_nofile=$(ulimit -H -n)
if [ "$hard_nofile" = unlimited ]; then hard_nofile=$(cat /proc/sys/fs/nr_open); fi
# shellcheck disable=SC3045
ulimit -S -n "$hard_nofile"

mkdir -p "$NGINX_RUNTIME_DIR"
config="$NGINX_RUNTIME_DIR/nginx.conf"
# envsubst's SHELL-FORMAT argument limits it to the template's placeholders.
envsubst "$placeholders" < "$template" > "$config"
# -e stderr: nginx opens its compiled-in error log before reading the config,
# which a non-root user on a read-only filesystem cannot.
exec nginx -e stderr -c "$config" "$@"
