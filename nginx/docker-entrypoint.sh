#!/bin/sh
# The nginx image's entrypoint, and the one renderer of nginx.conf.template
# (the local stack and the tests run it too, as `render`).
#
# Start (no argument, or nginx options): render the template from the
# environment into $NGINX_RUNTIME_DIR and exec nginx as PID 1.
#
# `render`: print the rendered configuration (template: $NGINX_TEMPLATE, else
# the baked-in one).
#
# The template's header lists the inputs. Each is turned into the template's
# dollar-brace UPPERCASE placeholders here, and only those are substituted
# (nginx's $variables stay). An input that is missing, or contradicts
# another, stops the start with its name: nginx never runs a half-filled config.
#
# `reload` (through docker exec): reload the running nginx and return once
# workers with the new configuration run and the old ones stopped accepting
# connections (the chaos suite's nginx-reload fault).
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

fail() {
    echo "nginx: refusing to start: $*" >&2
    exit 1
}

# Inputs that must be set (an empty value is allowed where it means "off").
require_set() {
    missing=""
    for name in "$@"; do
        is_set=""
        eval "is_set=\${$name+set}"
        [ "$is_set" = set ] || missing="$missing $name"
    done
    [ -z "$missing" ] || fail "unset variables:$missing"
}

# Every word of a space-separated list, as "PREFIX word SUFFIX" directives.
each() {
    prefix=$1 suffix=$2 list=$3 out=""
    for word in $list; do out="$out$prefix $word$suffix "; done
    echo "$out"
}

# The placeholders, from the inputs (the template's header says what each means).
derive() {
    require_set NGINX_LISTEN_PORT NGINX_RUNTIME_DIR GUNICORN_ADDRESSES NGINX_RESOLVER \
        NGINX_TLS_PORT NGINX_TLS_CERTIFICATE NGINX_TLS_CERTIFICATE_KEY NGINX_REAL_IP_FROM NGINX_REAL_IP_HEADER
    daphne_dns_name=${DAPHNE_DNS_NAME:-}
    daphne_addresses=${DAPHNE_ADDRESSES:-}

    # The WebSocket pool: a name resolved while running, or fixed addresses.
    if [ -n "$daphne_dns_name" ] && [ -n "$daphne_addresses" ]; then
        fail "DAPHNE_DNS_NAME and DAPHNE_ADDRESSES are both set: give one"
    elif [ -n "$daphne_dns_name" ]; then
        case "$daphne_dns_name" in
            *:[0-9]*) ;;
            *) fail "DAPHNE_DNS_NAME=$daphne_dns_name needs a port (host:port)" ;;
        esac
        DAPHNE_POOL=$daphne_dns_name
        DAPHNE_UPSTREAM=""
        resolvers=$NGINX_RESOLVER
        if [ "$resolvers" = auto ]; then
            resolvers=$(awk '$1 == "nameserver" { print $2 }' /etc/resolv.conf | tr '\n' ' ')
        fi
        [ -n "$resolvers" ] || fail "DAPHNE_DNS_NAME needs NGINX_RESOLVER (auto found no nameserver in /etc/resolv.conf)"
        bracketed=""
        for address in $resolvers; do
            case "$address" in
                \[*) ;;
                *:*) address="[$address]" ;;
            esac
            bracketed="$bracketed $address"
        done
        NGINX_RESOLVER_DIRECTIVE="resolver$bracketed valid=5s; resolver_timeout 2s;"
    elif [ -n "$daphne_addresses" ]; then
        DAPHNE_POOL=daphne
        DAPHNE_UPSTREAM="upstream daphne { least_conn; zone daphne 64k; $(each server ' max_fails=0;' "$daphne_addresses")}"
        NGINX_RESOLVER_DIRECTIVE=""
    else
        fail "set DAPHNE_DNS_NAME (host:port, resolved while running) or DAPHNE_ADDRESSES (fixed host:port list)"
    fi
    [ -n "$GUNICORN_ADDRESSES" ] || fail "GUNICORN_ADDRESSES is empty"
    GUNICORN_SERVERS=$(each server ';' "$GUNICORN_ADDRESSES")

    # Listeners: IPv6 too where the kernel has it.
    ipv6=""
    # (procfs files report size 0: read, do not test -s.)
    if grep -q . /proc/net/if_inet6 2>/dev/null; then ipv6=yes; fi
    NGINX_LISTEN="listen $NGINX_LISTEN_PORT;"
    [ -z "$ipv6" ] || NGINX_LISTEN="$NGINX_LISTEN listen [::]:$NGINX_LISTEN_PORT;"

    # The hop in front.
    proxy_protocol=""
    case "$NGINX_REAL_IP_HEADER" in
        proxy_protocol) proxy_protocol=" proxy_protocol" ;;
        X-Forwarded-For | X-Real-IP) ;;
        *) fail "NGINX_REAL_IP_HEADER=$NGINX_REAL_IP_HEADER: use X-Forwarded-For, X-Real-IP or proxy_protocol" ;;
    esac
    if [ -n "$NGINX_REAL_IP_FROM" ]; then
        NGINX_REAL_IP_DIRECTIVES="$(each set_real_ip_from ';' "$NGINX_REAL_IP_FROM")real_ip_header $NGINX_REAL_IP_HEADER; real_ip_recursive on;"
        NGINX_TRUSTED_PROXIES=$(each '' ' 1;' "$NGINX_REAL_IP_FROM")
    else
        NGINX_REAL_IP_DIRECTIVES=""
        NGINX_TRUSTED_PROXIES=""
    fi

    # TLS, when a certificate is given.
    if [ -n "$NGINX_TLS_CERTIFICATE" ] || [ -n "$NGINX_TLS_CERTIFICATE_KEY" ]; then
        if [ -z "$NGINX_TLS_CERTIFICATE" ] || [ -z "$NGINX_TLS_CERTIFICATE_KEY" ]; then
            fail "NGINX_TLS_CERTIFICATE and NGINX_TLS_CERTIFICATE_KEY go together"
        fi
        NGINX_TLS="listen $NGINX_TLS_PORT ssl$proxy_protocol;"
        [ -z "$ipv6" ] || NGINX_TLS="$NGINX_TLS listen [::]:$NGINX_TLS_PORT ssl$proxy_protocol;"
        NGINX_TLS="$NGINX_TLS ssl_certificate $NGINX_TLS_CERTIFICATE; ssl_certificate_key $NGINX_TLS_CERTIFICATE_KEY;"
    elif [ -n "$proxy_protocol" ]; then
        fail "NGINX_REAL_IP_HEADER=proxy_protocol applies to the TLS listener: set NGINX_TLS_CERTIFICATE and _KEY"
    else
        NGINX_TLS=""
    fi
    export DAPHNE_POOL DAPHNE_UPSTREAM GUNICORN_SERVERS NGINX_RESOLVER_DIRECTIVE NGINX_LISTEN \
        NGINX_REAL_IP_DIRECTIVES NGINX_TRUSTED_PROXIES NGINX_TLS
}

render() {
    template=${NGINX_TEMPLATE:-/etc/nginx/blueprint/nginx.conf.template}
    derive
    # shellcheck disable=SC2016 # the pattern matches a literal ${NAME}
    placeholders=$(grep -o '\${[A-Z][A-Z0-9_]*}' "$template" | sort -u)
    [ -n "$placeholders" ] || fail "no placeholders found in $template"
    for placeholder in $placeholders; do
        name=${placeholder#??}
        name=${name%?}
        require_set "$name"
    done
    # envsubst's SHELL-FORMAT argument limits it to the template's placeholders.
    envsubst "$placeholders" < "$template"
}

case "${1:-}" in
    reload)
        reload
        exit
        ;;
    render)
        render
        exit
        ;;
esac

config_text=$(render)

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
printf '%s\n' "$config_text" > "$config"
# -e stderr: nginx opens its compiled-in error log before reading the config,
# which a non-root user on a read-only filesystem cannot.
exec nginx -e stderr -c "$config" "$@"
