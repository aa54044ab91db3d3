#!/usr/bin/env bash
# Keyway network test bed: network namespaces, veth pairs and nftables NATs.
# Topology and usage: see README.md next to this file. Needs root, iproute2, nftables, conntrack.
#
#   netbed.sh up PREFIX FLAVOUR [cgnat]   build the bed (FLAVOUR: preserve | random | short-timeout)
#   netbed.sh down PREFIX                 delete every namespace whose name starts with PREFIX-
#   netbed.sh stale                       delete kwt-<pid>-* namespaces whose pid is gone
#   netbed.sh nat NS RULESET...           helpers used by the tests (see functions below)
#
# Nothing here touches the root namespace's interfaces, routes or firewall: every link is a veth
# pair created directly between two namespaces of the bed, and no namespace has a route out.
set -euo pipefail

# Documentation ranges only on the "public" segment (RFC 5737).
RELAY_IP=203.0.113.10
INET_RELAY_IP=203.0.113.1
INET_A_IP=198.51.100.1   NAT_A_WAN=198.51.100.2     # 198.51.100.0/26
INET_B_IP=198.51.100.65  NAT_B_WAN=198.51.100.66    # 198.51.100.64/26 (CGN's public side in the cgnat variant)
# Private ranges exist only inside the bed's namespaces.
HUB_IP=10.1.0.2   NAT_A_LAN=10.1.0.1
APP_IP=10.2.0.2   NAT_B_LAN=10.2.0.1
CGN_INSIDE=100.64.0.1   HOME_B_WAN=100.64.0.2     # RFC 6598 shared address space between CGN and home router B

ns() { ip netns exec "$@"; }

# link NS1 IF1 ADDR1/LEN NS2 IF2 ADDR2/LEN
link() {
    ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
    ip -n "$1" addr add "$3" dev "$2"
    ip -n "$4" addr add "$6" dev "$5"
    ip -n "$1" link set "$2" up
    ip -n "$4" link set "$5" up
}

mkns() {
    ip netns add "$1"
    ip -n "$1" link set lo up
}

router() {
    ns "$1" sysctl -qw net.ipv4.ip_forward=1
    # Unsolicited traffic must not be answered with ICMP from the router either.
    ns "$1" sysctl -qw net.ipv4.icmp_ratelimit=0 >/dev/null 2>&1 || true
}

# nat_rules NS MASQ_OPTS: masquerade lan->wan, stateful forward filter dropping unsolicited inbound,
# and an input filter that drops unsolicited packets to the router itself (as home routers do).
nat_rules() {
    local nsname=$1 masq=${2:-}
    ns "$nsname" nft -f - <<EOF
table ip kwt {
    chain loss {
    }
    chain block {
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        jump loss
        jump block
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade $masq comment "kwt-masq"
    }
}
EOF
}

timeouts() {
    # Both the unreplied and the "stream" (seen both ways, which QUIC always is) UDP timeouts.
    ns "$1" sysctl -qw net.netfilter.nf_conntrack_udp_timeout="$2"
    ns "$1" sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream="$2"
}

up() {
    local p=$1 flavour=$2 variant=${3:-}
    local masq=""
    case $flavour in
        preserve) masq="" ;;
        random) masq="random" ;;
        short-timeout) masq="" ;;
        *) echo "unknown NAT flavour $flavour" >&2; exit 2 ;;
    esac
    for n in inet relay nata hub natb app; do mkns "$p-$n"; done
    [ "$variant" = cgnat ] && mkns "$p-cgn"

    link "$p-inet" relay "$INET_RELAY_IP/24" "$p-relay" wan "$RELAY_IP/24"
    link "$p-inet" nata "$INET_A_IP/26" "$p-nata" wan "$NAT_A_WAN/26"
    link "$p-nata" lan "$NAT_A_LAN/24" "$p-hub" wan "$HUB_IP/24"
    if [ "$variant" = cgnat ]; then
        link "$p-inet" natb "$INET_B_IP/26" "$p-cgn" wan "$NAT_B_WAN/26"
        link "$p-cgn" lan "$CGN_INSIDE/24" "$p-natb" wan "$HOME_B_WAN/24"
        ip -n "$p-natb" route add default via "$CGN_INSIDE"
        ip -n "$p-cgn" route add default via "$INET_B_IP"
    else
        link "$p-inet" natb "$INET_B_IP/26" "$p-natb" wan "$NAT_B_WAN/26"
        ip -n "$p-natb" route add default via "$INET_B_IP"
    fi
    link "$p-natb" lan "$NAT_B_LAN/24" "$p-app" wan "$APP_IP/24"

    ip -n "$p-relay" route add default via "$INET_RELAY_IP"
    ip -n "$p-nata" route add default via "$INET_A_IP"
    ip -n "$p-hub" route add default via "$NAT_A_LAN"
    ip -n "$p-app" route add default via "$NAT_B_LAN"

    router "$p-inet"
    router "$p-nata"
    router "$p-natb"
    nat_rules "$p-nata" "$masq"
    nat_rules "$p-natb" "$masq"
    if [ "$variant" = cgnat ]; then
        router "$p-cgn"
        nat_rules "$p-cgn" "$masq"
    fi
    # short-timeout: 3 s (or $KWT_UDP_TIMEOUT); any flavour: $KWT_UDP_TIMEOUT_ALL if set.
    local t=${KWT_UDP_TIMEOUT_ALL:-}
    [ "$flavour" = short-timeout ] && t=${t:-${KWT_UDP_TIMEOUT:-3}}
    if [ -n "$t" ]; then
        for n in nata natb ${variant:+cgn}; do timeouts "$p-$n" "$t"; done
    fi
}

down() {
    local p=$1
    for n in $(ip netns list | awk '{print $1}' | grep -E "^$p-" || true); do
        # Kill anything still running in it (only processes inside the bed's own namespace).
        for pid in $(ip netns pids "$n" 2>/dev/null || true); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns delete "$n" 2>/dev/null || true
    done
}

stale() {
    for n in $(ip netns list | awk '{print $1}' | grep -E '^kwt-[0-9]+-' || true); do
        local pid=${n#kwt-}; pid=${pid%%-*}
        if [ ! -d "/proc/$pid" ]; then
            for q in $(ip netns pids "$n" 2>/dev/null || true); do kill -9 "$q" 2>/dev/null || true; done
            ip netns delete "$n" 2>/dev/null || true
        fi
    done
}

cmd=${1:-}; shift || true
case $cmd in
    up) up "$@" ;;
    down) down "$@" ;;
    stale) stale ;;
    timeouts) timeouts "$@" ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
